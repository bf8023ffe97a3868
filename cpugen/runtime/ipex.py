"""The ipex backend: Intel Extension for PyTorch applied to cpugen's model.

- every nn.Linear whose weight is not shared becomes IPEX's `_IPEXLinear`, its weight reordered
  once into oneDNN's blocked layout (`ipex.optimize(inplace=True)`: each packed weight replaces its
  original, so nothing holds the weights twice), block by block, each followed by
  `memory.release_freed`; a tied lm_head (OPT) is left as it is;
- LayerNorm/RMSNorm run through `ipex.llm.functional.fast_layer_norm` / `rms_norm`.
Its memory and numerics, measured and tested (tests/test_ipex.py): docs/performance.md, "The ipex
backend: memory and numerics". IPEX 2.8 needs torch 2.8, so it lives in its own environment:
`bash scripts/ipex_env.sh`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

import torch

from cpugen.errors import CpugenError
from cpugen.host.memory import release_freed
from cpugen.model.transformer import Linear, Norm, Transformer

HINT = ("install it in its own environment with `bash scripts/ipex_env.sh` (torch 2.8 + "
        "intel-extension-for-pytorch 2.8.0), then run cpugen from that environment")

_import: tuple | None = None  # (module or None, reason): one import attempt per process


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


def import_ipex():
    """(ipex, None), or (None, a one-line reason)."""
    global _import
    if _import is None:
        with _captured_output() as output:
            try:
                import intel_extension_for_pytorch as ipex
                _import = (ipex, None)
            except Exception as e:  # noqa: BLE001 - absent, or built for another torch
                # IPEX's torch-version check prints its reason, then fails on `os.exit`
                said = [ln.strip() for ln in output().splitlines() if ln.startswith("ERROR!")]
                _import = (None, said[0] if said else f"{type(e).__name__}: {e}".splitlines()[0])
    return _import


def bf16_ok(ipex) -> bool:
    """IPEX's bf16 prepacking asserts avx512bw/vl/dq or avx_ne_convert; without them auto means eager."""
    try:
        return bool(ipex._C.onednn_has_bf16_support())
    except Exception:  # noqa: BLE001 - an IPEX without the probe: let optimize decide
        return True


def _optimize(ipex, module, dtype):
    # inplace: each packed weight replaces its original, so the weights are never held twice.
    # The folding/dropout/LSTM passes do nothing for this model but fx-trace it: off.
    # IPEX's bf16 prepacking needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; without them (AVX2 CPUs)
    # the weights stay as they are and IPEX's fused norms still apply.
    prepack = dtype != torch.bfloat16 or bf16_ok(ipex)
    return ipex.optimize(module, dtype=dtype, inplace=True, weights_prepack=prepack, auto_kernel_selection=True,
                         conv_bn_folding=False, linear_bn_folding=False, replace_dropout_with_identity=False,
                         optimize_lstm=False)


def apply(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Prepares `model` in place for IPEX; returns the module to call. The blocks are optimized one
    at a time, each followed by `release_freed`, then the whole model once more (the lm_head): in one
    `optimize` call the freed originals could stay resident until the end (measured: RSS up to 204
    MiB above the model during it, 5-40% of the weights above it afterwards)."""
    ipex, why = import_ipex()
    if ipex is None:  # apply() without resolve()
        raise CpugenError(f"--backend ipex needs intel-extension-for-pytorch ({why}): {HINT}")
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
