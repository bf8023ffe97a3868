#!/usr/bin/env python3
"""Checks the decode step's small kernels against their references (kernels/reference.py):
argmax.h against torch.argmax (ties, NaN, infinities, lengths off the 16-wide vectors), norm.h
against reference.norm (LayerNorm and RMSNorm) and glu.h against reference.glu (every activation),
each within one bf16 rounding where the fp32 sums run in another order.

    python kernels/check_step_ops.py      # exits non-zero on a mismatch, or where the kernels are unavailable
Benchmark: kernels/bench_step_ops.py; tests/test_kernels.py holds the finer cases."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# kernels/ is a directory of sources beside their checks, not a package (the top-level name
# `kernels` is Hugging Face's, which transformers requires): its scripts import each other by file
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cpugen.runtime.native import step_kernels  # noqa: E402
import reference  # noqa: E402


def _close(got: torch.Tensor, want: torch.Tensor, what: str):
    """Within one bf16 ulp of the larger value, and mostly identical. Values under 2^-16 of the
    tensor's largest are held to that floor: there torch's own bf16 ops disagree with themselves
    (gelu's tanh form of -5.1 is -1.5e-7 through its scalar path and 0 through its vector one,
    where the exact value is -1.2e-7)."""
    floor = max(2 ** -20, want.float().abs().max().item() * 2 ** -16) if want.numel() else 2 ** -20
    ulp = want.float().abs().clamp(min=floor) * 2 ** -7
    diff = (got.float() - want.float()).abs()
    if got.shape != want.shape or not (diff <= 2 * ulp).all() or (got == want).float().mean() < 0.8:
        raise AssertionError(f"{what}: max difference {diff.max():.3g}, {(got == want).float().mean():.0%} identical")


def argmax_cases(dtype: torch.dtype, seed: int = 0):
    """(name, logits) to hold an argmax to torch.argmax: ties (the first maximum wins), NaN (the
    first NaN wins, as torch orders it above everything), +inf, rows of -inf only, a NaN last, and
    row lengths off the 16-wide vectors."""
    g = torch.Generator().manual_seed(seed)
    for B, V in [(1, 1), (1, 15), (3, 17), (2, 31), (4, 50400), (33, 1000)]:
        for kind in ("random", "ties", "nan", "inf", "-inf", "nan last"):
            x = torch.randn(B, V, generator=g).to(dtype)
            if kind == "ties":
                x = (x * 2).round().clamp(-2, 2)
            elif kind in ("nan", "inf"):
                x[:, 1::3] = float(kind)
            elif kind == "-inf":
                x.fill_(float("-inf"))
            elif kind == "nan last":
                x[:, -1] = float("nan")
            yield f"{dtype} ({B}, {V}) {kind}", x


def check_argmax(ext, seed: int = 0) -> int:
    n = 0
    for dtype in (torch.bfloat16, torch.float32):
        for name, x in argmax_cases(dtype, seed):
            if not torch.equal(ext.argmax(x), torch.argmax(x, dim=-1)):
                raise AssertionError(f"argmax {name}")
            n += 1
    return n


def check_norm(ext, seed: int = 0) -> int:
    g, cases = torch.Generator().manual_seed(seed), [(rms, h, shape) for rms in (False, True)
                                                     for h, shape in [(3, (1, 3)), (17, (4, 17)), (2050, (3, 2050))]]
    for rms, h, shape in cases:
        w = (torch.randn(h, generator=g) + 1).bfloat16()
        b = None if rms else torch.randn(h, generator=g).bfloat16()
        x = (torch.randn(shape, generator=g) * 3 + 5).bfloat16()
        _close(ext.norm(x, w, b, 1e-5, rms), reference.norm(x, w, b, 1e-5, rms), f"norm rms={rms} h={h}")
    return len(cases)


def check_glu(ext, seed: int = 0) -> int:
    g, cases = torch.Generator().manual_seed(seed), [(act, shape) for act in reference.ACTIVATIONS if act
                                                     for shape in [(1, 10), (3, 80), (2, 3, 2752)]]
    for act, shape in cases:
        gu = (torch.randn(shape, generator=g) * 3).bfloat16()
        _close(ext.glu(gu, reference.ACTIVATIONS[act]), reference.glu(gu, act), f"glu {act} {shape}")
    return len(cases)


if __name__ == "__main__":
    ext = step_kernels()  # at this CPU's level: AVX-512 (kernels/gemv_bf16.cpp) or AVX2 (kernels/avx2.cpp)
    if ext is None:
        sys.exit("native step kernels unavailable on this machine (they need AVX2 and FMA at least)")
    print(f"argmax: {check_argmax(ext)} cases, norm: {check_norm(ext)}, glu: {check_glu(ext)}: all within tolerance")
