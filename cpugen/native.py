"""cpugen's native CPU kernels (C++ in kernels/), built on first use and cached.

Built through torch.utils.cpp_extension into ~/.cache/cpugen/ext/<torch version>/; a later
process loads the cached build in well under a second. Where the build is impossible (no compiler,
no ninja) or the CPU lacks the instructions, `gemv()` is None and callers use the torch reference.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

CACHE = Path(os.environ.get("CPUGEN_CACHE", Path.home() / ".cache" / "cpugen")) / "ext"


def source_dir() -> Path:
    """kernels/ ships inside the wheel as `cpugen.kernels`; in a checkout it is beside the package."""
    try:
        return Path(str(resources.files("cpugen.kernels")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "kernels"


@lru_cache(maxsize=None)
def extension(name: str = "gemv_bf16", portable: bool = False):
    """The compiled module for kernels/<name>.cpp, or None (with the reason in `why_not`).
    Kernels need AVX-512; `portable` code (thread placement) builds on any x86-64 or ARM CPU."""
    from cpugen.env import cpu_info

    if not portable and not cpu_info()["avx512"]:
        _why[name] = "the CPU lacks AVX-512 (F, BW and VL)"
        return None
    try:
        from torch.utils import cpp_extension

        build = CACHE / torch.__version__.replace("+", "_") / name
        build.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(build / "lock")
        source, built = source_dir() / f"{name}.cpp", build / f"cpugen_{name}.so"
        newest = max(p.stat().st_mtime for p in [source, *_headers(source)])  # ninja rebuilds on either
        if not built.exists() or built.stat().st_mtime < newest:
            print(f"cpugen: building kernels/{name}.cpp for this machine and torch {torch.__version__} "
                  f"(once, about half a minute; cached in {build})", file=sys.stderr)
        return cpp_extension.load(name=f"cpugen_{name}", sources=[str(source)],
                                  extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                                  build_directory=str(build), verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back
        _why[name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        print(f"cpugen: native {name} unavailable ({_why[name]}); "
              + ("threads stay unpinned" if portable else "using the torch reference"), file=sys.stderr)
        return None


def _headers(source: Path, seen: set | None = None) -> list[Path]:
    """The kernels/ headers a source includes (`#include "x.h"`), and those they include."""
    import re

    seen = set() if seen is None else seen
    for n in re.findall(r'^#include "([^"]+)"', source.read_text(), re.M):
        h = source.parent / n
        if h.exists() and h not in seen:
            seen.add(h)
            _headers(h, seen)
    return sorted(seen)


_why: dict[str, str] = {}
STALE_LOCK_S = 600  # a build takes under a minute; an older lock was left by a process killed mid-build


def _clear_stale_lock(lock: Path):
    """cpp_extension serializes builds with a lock file and waits forever while it exists; one left
    by a killed build would hang every later process."""
    import time

    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            print(f"cpugen: removed a stale build lock {lock}", file=sys.stderr)
    except FileNotFoundError:
        pass


def why_not(name: str = "gemv_bf16") -> str | None:
    return _why.get(name)


@lru_cache(maxsize=None)
def _argmax():
    if os.environ.get("CPUGEN_NATIVE", "1") == "0":
        return None
    ext = extension()
    return ext.argmax if ext is not None else None


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) int64: greedy decoding's choice, torch.argmax's answer (first maximum,
    first NaN), through kernels/argmax.h where it builds (25x faster at 50400 logits: 7 against 180
    us a row on a Zen 4 core), torch.argmax otherwise."""
    fn = _argmax() if logits.dim() == 2 and logits.dtype in (torch.bfloat16, torch.float32) else None
    return fn(logits) if fn is not None else logits.argmax(dim=-1)


def packing_wanted() -> bool:
    """Whether the eager backend repacks bf16 weights into cpugen's packed layout: on CPUs with
    AVX512-BF16 and without AMX (with AMX, oneDNN's tile kernels are prefill's fastest path, and
    they read the plain layout). CPUGEN_LAYOUT=plain keeps the plain weights."""
    from cpugen.env import cpu_info

    info = cpu_info()
    return os.environ.get("CPUGEN_LAYOUT", "auto") != "plain" and info["avx512_bf16"] and not info["amx_bf16"]


def install(model: torch.nn.Module, pack: bool | None = None) -> bool:
    """Routes the model's bf16 matmuls through the native kernels and decode attention over the
    cache through the native kernel (AVX512-BF16); False when unavailable or switched off with
    CPUGEN_NATIVE=0, leaving the torch path in place. With `pack` (default: packing_wanted()),
    every weight not shared with the embedding is repacked into cpugen's layout, block by block,
    each block's freed originals handed back to the OS before the next: the model is never held
    twice. Otherwise the gemv takes decode's skinny matmuls on the plain weights."""
    from cpugen.env import cpu_info
    from cpugen.memory import release_freed
    from cpugen.model import MLP, Attention, Linear, Norm

    if os.environ.get("CPUGEN_NATIVE", "1") == "0":
        return False
    ext = extension()
    if ext is None:
        return False
    attn = extension("decode_attention") if cpu_info()["avx512_bf16"] else None
    for m in model.modules():
        if isinstance(m, Linear):
            m.kernel = ext.gemv
        elif isinstance(m, Attention) and attn is not None and m.hd % 32 == 0 and m.hd <= 256:
            m.decode_step = attn.decode_step
        elif type(m) is Norm and m.weight.dtype == torch.bfloat16 and m.impl is None:
            m.impl = NativeNorm(ext, m)
        elif type(m) is MLP and m.glu and m.product is None:
            m.product = NativeGlu(ext, m)
    if (packing_wanted() if pack is None else pack) and ext.packed_available():
        tied = model.wte.weight
        for part in [*model.blocks, model]:  # the model last: its lm_head (the blocks are done by then)
            for m in part.modules():
                if (type(m) is Linear and m.weight is not None and m.weight is not tied
                        and m.weight.dtype == torch.bfloat16 and m.in_features % 2 == 0):
                    m.pack_panels(ext)
            release_freed()
    if all(b.attn.decode_step is not None for b in model.blocks):
        install_stack(model)
    return True


STACK_ANY_BATCH = 1 << 20  # the stack's rows where every weight is packed


class NativeNorm:
    """A Norm's computation through kernels/norm.h (bf16 rows, fp32 math), which the decode stack
    runs too: the Python blocks and the stack then agree bit for bit. Other dtypes take the
    module's torch path."""

    def __init__(self, ext, norm):
        self.ext, self.norm = ext, norm

    def __call__(self, x):
        n = self.norm
        if x.dtype != torch.bfloat16:
            return n.reference(x)
        return self.ext.norm(x, n.weight, n.bias, n.eps, n.kind == "rmsnorm")


class NativeGlu:
    """A GLU MLP's act(gate) * up through kernels/glu.h (bf16), which the decode stack runs too;
    other dtypes take the module's torch path."""

    def __init__(self, ext, mlp):
        from cpugen.model import KERNEL_ACT

        self.ext, self.mlp, self.code = ext, mlp, KERNEL_ACT[mlp.act]

    def __call__(self, gu):
        if gu.dtype != torch.bfloat16:
            return self.mlp.glu_reference(gu)
        return self.ext.glu(gu, self.code)


def install_stack(model) -> bool:
    """Gives the model a native decode stack (kernels/decode_layer.cpp): a whole decode step in one
    call (embedding, every block, final norm, lm_head), holding references to the model's own
    weights, plain or packed (no copy). It serves any batch where every weight is packed (the
    packed kernel takes any number of rows), the gemv's batches (Linear.kernel_rows) otherwise.
    False where it does not build or the modules are not all plain cpugen modules."""
    from cpugen.model import KERNEL_ACT, Linear, Norm

    ext = extension("decode_layer")
    if ext is None:
        return False
    cfg, blocks, outs = model.cfg, [], []
    head = model.lm_head
    if (type(head) is not Linear or (head.weight is None and head.panels is None)
            or type(model.ln_f) is not Norm or not isinstance(model.ln_f.impl, NativeNorm)):
        return False
    for b in model.blocks:
        mods = (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out)
        if (any(type(m) is not Linear or (m.weight is None and m.panels is None) for m in mods)
                or any(type(n) is not Norm or not isinstance(n.impl, NativeNorm)
                       for n in (b.ln_1, b.ln_2) if n is not None)
                or (b.mlp.glu and not isinstance(b.mlp.product, NativeGlu))):
            return False
        ln_2 = (b.ln_2.weight, b.ln_2.bias) if b.ln_2 is not None else (None, None)
        blocks.append([b.ln_1.weight, b.ln_1.bias, *ln_2,
                       *(t for m in mods for t in (m.weight if m.panels is None else m.panels, m.bias))])
        outs.append([m.out_features for m in mods])
    model.decode_stack = ext.Stack(blocks, outs, cfg.norm, cfg.norm_eps, cfg.parallel_residual, cfg.mlp == "glu",
                                   KERNEL_ACT[cfg.activation], cfg.n_head,
                                   cfg.rotary_dim if cfg.position == "rotary" else 0)
    every = [*(m for b in model.blocks for m in (b.attn.wqkv, b.attn.wo, b.mlp.w_in, b.mlp.w_out)), head]
    model.decode_stack_rows = STACK_ANY_BATCH if all(m.panels is not None for m in every) else Linear.kernel_rows
    rope = model.rotary
    model.decode_stack.set_head(model.wte.weight, model.wpe.weight if model.wpe is not None else None,
                                cfg.position_offset, rope.cos if rope else None, rope.sin if rope else None,
                                model.ln_f.weight, model.ln_f.bias,
                                head.weight if head.panels is None else head.panels, head.bias, head.out_features)
    return True
