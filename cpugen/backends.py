"""Backends: what runs cpugen's model. `eager` is PyTorch's own CPU path with cpugen's native
kernels (kernels/: on AVX512-BF16 CPUs without AMX, every matmul on the weights repacked once into
cpugen's packed layout, prefill's included; elsewhere the gemv for decode's skinny matmuls on the
plain weights; the fused decode step, and the decode stack that runs every block of a small-batch
decode step in one call); `ipex` applies Intel Extension for PyTorch (weight prepacking through
`ipex.optimize`, its fused norm kernels); `auto` takes the fastest available:
- bf16 on a CPU with AVX512-BF16, where the native kernels build: eager. Measured on gptj-1b
  (prompt 128, 32 new tokens), 2 Zen 4 threads, in IPEX's own environment (torch 2.8), decode
  step eager / ipex: batch 1 91.5 / 178.6 ms, batch 4 94.2 / 149.7 ms, batch 16 177.7 / 296.9 ms;
  prompt times equal (both oneDNN). Against Hugging Face + `ipex.llm`: docs/performance.md;
- otherwise ipex when it imports (and can run bf16 here), else eager (PyTorch's ops alone).

IPEX 2.8 needs torch 2.8, so it lives in its own environment: `bash scripts/ipex_env.sh`.

What the ipex backend changes, and what it was checked against (tests/test_ipex.py):
- every nn.Linear whose weight is not shared becomes IPEX's `_IPEXLinear`, its weight reordered
  once into oneDNN's blocked layout; a tied lm_head (OPT) shares the embedding's storage and is
  left as it is (IPEX never prepacks a parameter two modules use).
- memory: `inplace=True` replaces each weight by its packed copy, so nothing holds the weights
  twice; `apply` packs block by block and trims the allocator after each (see `apply`). gptj-1b
  with 4 layers, 778 MiB of bf16 weights: RSS after optimize -25 to -33 MiB (unchanged, less
  the loader's garbage), high-water mark +140-148 MiB during it, under the largest single
  tensor (the 197 MiB lm_head); fp32, 1556 MiB: +6 MiB after, +320 MiB peak (lm_head 394 MiB).
- LayerNorm/RMSNorm run through `ipex.llm.functional.fast_layer_norm` / `rms_norm`. RMSNorm
  rounds once where eager rounds twice (normalize -> bf16, then * weight): up to 1 bf16 ulp per
  element, and on average slightly closer to fp32 than eager.
- bf16 logits differ from eager by no more than eager bf16 differs from fp32 (test models: GPT-J
  and OPT identical, Llama-GQA 0.77% of the largest logit vs eager's own 0.72%); fp32 logits
  agree to 1e-4 relative, greedy tokens wherever eager's top-2 margin is not a near-tie.
- dtype float32 works too (oneDNN fp32 kernels through auto_kernel_selection).
Not adopted: IPEX's rotary kernel (torch.ops.torch_ipex.rotary_position_embedding). It matches
eager (1 ulp on ~1e-5 of the elements) and is 3.5-5.5x faster at prefill (T=512: 84 -> 23 ms on
llama-2-7b's q; rotary is ~11% of an eager llama-2-7b prefill), but cpugen's Attention has no
per-backend hook for rotary (model.py would need one), it needs per-row position ids rather than
the gathered cos/sin tables, and its decode-step (T=1) timing here was erratic (0.01-7 ms).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch

from cpugen.errors import CpugenError
from cpugen.memory import release_freed
from cpugen.model import Linear, Norm, Transformer

BACKENDS = ("auto", "eager", "ipex")
IPEX_HINT = ("install it in its own environment with `bash scripts/ipex_env.sh` (torch 2.8 + "
             "intel-extension-for-pytorch 2.8.0), then run cpugen from that environment")

_ipex_import: tuple | None = None  # (module or None, reason): one import attempt per process


@contextlib.contextmanager
def _captured_output():
    """Holds back what is written to stdout and stderr, at the fd level (C++ warnings included) and
    through sys.stdout/sys.stderr; yields a function returning it. IPEX's import prints
    kernel-override notices and a CUDA_HOME note on stderr, and its torch-version check prints on
    stdout, which would corrupt `--json -`."""
    with tempfile.TemporaryFile() as tmp:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # a closed standard stream: nothing to protect
            yield lambda: ""
            return
        py = open(os.dup(tmp.fileno()), "w", errors="replace")
        saved_py = sys.stdout, sys.stderr
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        sys.stdout = sys.stderr = py

        def text() -> str:
            py.flush()
            tmp.seek(0)
            return tmp.read().decode(errors="replace")

        try:
            yield text
        finally:
            py.flush()
            sys.stdout, sys.stderr = saved_py
            py.close()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _import_ipex():
    """(ipex, None), or (None, a one-line reason)."""
    global _ipex_import
    if _ipex_import is None:
        with _captured_output() as output:
            try:
                import intel_extension_for_pytorch as ipex
                _ipex_import = (ipex, None)
            except Exception as e:  # noqa: BLE001 - absent, or built for another torch
                # IPEX's torch-version check prints its reason, then fails on `os.exit`
                said = [ln.strip() for ln in output().splitlines() if ln.startswith("ERROR!")]
                _ipex_import = (None, said[0] if said else f"{type(e).__name__}: {e}".splitlines()[0])
    return _ipex_import


def _bf16_ok(ipex) -> bool:
    """IPEX's bf16 prepacking asserts avx512bw/vl/dq or avx_ne_convert; without them auto means eager."""
    try:
        return bool(ipex._C.onednn_has_bf16_support())
    except Exception:  # noqa: BLE001 - an IPEX without the probe: let optimize decide
        return True


def native_decode_available() -> bool:
    """Whether the eager backend gets cpugen's native bf16 decode kernels on this machine (builds
    them on first use: about half a minute, once per machine and torch version)."""
    from cpugen import native
    from cpugen.env import cpu_info

    if os.environ.get("CPUGEN_NATIVE", "1") == "0" or not cpu_info()["avx512_bf16"]:
        return False
    return native.extension() is not None and native.extension("decode_attention") is not None


def resolve(name: str, dtype: str = "bfloat16") -> str:
    if name not in BACKENDS:
        raise CpugenError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "eager":
        return "eager"
    if name == "auto" and dtype == "bfloat16" and native_decode_available():
        return "eager"
    ipex, why = _import_ipex()
    if ipex is None:
        if name == "ipex":
            raise CpugenError(f"--backend ipex needs intel-extension-for-pytorch ({why}): {IPEX_HINT}")
        return "eager"
    if name == "auto" and not _bf16_ok(ipex):
        return "eager"
    return "ipex"


def _optimize(ipex, module, dtype):
    # inplace: each packed weight replaces its original, so the weights are never held twice.
    # The folding/dropout/LSTM passes do nothing for this model but fx-trace it: off.
    return ipex.optimize(module, dtype=dtype, inplace=True, weights_prepack=True, auto_kernel_selection=True,
                         conv_bn_folding=False, linear_bn_folding=False, replace_dropout_with_identity=False,
                         optimize_lstm=False)


def gemv_max_batch() -> int:
    """Where the weights stay plain (CPUs with AMX, or CPUGEN_LAYOUT=plain), decode batches up to this
    use cpugen's gemv; larger ones, oneDNN's packed weights. Measured (kernels/bench_gemv.py, GB/s of weights at 1 / 2 / 4 / 8 rows): on 2 Zen 4
    cores, weights on huge pages, the gemv 31.2 / 30.4 / 29.4 / 22.9 against oneDNN prepacked
    21.8 / 19.7 / 26.2 / 21.8 (level at 8 rows, within the spread; oneDNN ahead at 16); on 16 Xeon (AMX) cores 120.5 / - / 109.3 / 74.0 against 68.6 / - / 65.4 / 65.3 (kernels/README.md)."""
    return Linear.kernel_rows


def for_batch(model: Transformer, backend: str, dtype: torch.dtype, batch: int):
    """Readies the eager backend's matmuls for decode at `batch`: above gemv_max_batch() the
    plain weights are packed for oneDNN (in place, layer by layer, one way: the gemv needs the
    plain layout, so a model once packed stays packed). Weights in cpugen's packed layout serve
    every batch as they are."""
    if backend != "eager" or dtype != torch.bfloat16 or batch <= gemv_max_batch():
        return
    if os.environ.get("CPUGEN_PACK", "1") == "0":
        return
    tied = model.wte.weight
    plain = lambda part: [m for m in part.modules()  # noqa: E731
                          if type(m) is Linear and m.weight is not None and m.weight is not tied]
    if any(plain(b) for b in model.blocks):
        model.decode_stack = None  # it holds the plain weights: dropped first, or packing would keep both
    for part in [*model.blocks, model]:
        for m in plain(part):
            m.pack()
        release_freed()


def decode_matmul(model: Transformer, backend: str) -> str:
    """What ran decode's matmuls, for the record."""
    if backend != "eager":
        return backend
    block = model.blocks[0].mlp.w_in
    if getattr(block, "panels", None) is not None:
        return "cpugen-packed"
    if getattr(block, "packed", None) is not None:
        return "onednn-packed"
    return "cpugen-gemv" if getattr(block, "kernel", None) is not None else "torch"


def decode_blocks(model: Transformer, batch: int) -> str:
    """How decode ran the blocks at `batch`, for the record: all in one native call, or one by one."""
    stack = getattr(model, "decode_stack", None)
    return "native-stack" if stack is not None and batch <= model.decode_stack_rows else "python"


def apply(model: Transformer, backend: str, dtype: torch.dtype) -> Transformer:
    """Prepares `model` in place for `backend` (already resolved); returns the module to call.

    ipex: the blocks are packed one at a time, each followed by `memory.release_freed`, then the
    whole model once more (the lm_head; the blocks are packed already, and a tied lm_head is seen
    to be shared and left alone). In one `optimize` call the freed originals could stay resident
    until the end: measured on a 365 MiB model, RSS rose by up to 204 MiB during optimize and stayed
    5-40% of the weights above the model's afterwards, varying from run to run."""
    if backend == "eager":
        if dtype == torch.bfloat16:  # decode's skinny matmuls through cpugen's native gemv
            from cpugen import native

            native.install(model)
        return model
    ipex, why = _import_ipex()
    if ipex is None:  # apply() without resolve()
        raise CpugenError(f"--backend ipex needs intel-extension-for-pytorch ({why}): {IPEX_HINT}")
    # IPEX prepacks exactly torch.nn.Linear (it looks the class up in a table), not subclasses
    # such as cpugen's Linear: hand it plain ones (same object and parameters, class swapped)
    for m in model.modules():
        if type(m) is Linear:
            m.__class__ = torch.nn.Linear
    try:
        for block in model.blocks:
            _optimize(ipex, block, dtype)
            release_freed()
        model = _optimize(ipex, model, dtype)
    except (AssertionError, RuntimeError, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CpugenError(f"ipex.optimize failed for {str(dtype).replace('torch.', '')} on this CPU ({why}): "
                          "use --backend eager") from None
    finally:
        for m in model.modules():  # what IPEX left unpacked (a tied lm_head): back to cpugen's class
            if type(m) is torch.nn.Linear:
                m.__class__ = Linear
    release_freed()
    fused = ipex.llm.functional
    for m in model.modules():
        if isinstance(m, Norm):
            if m.kind == "layernorm":
                m.impl = lambda x, m=m: fused.fast_layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)
            else:
                m.impl = lambda x, m=m: fused.rms_norm(x, m.weight, m.eps)
    return model
