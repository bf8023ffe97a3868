"""Checks the native gemv against kernels/reference.py on random inputs of awkward shapes.

    python kernels/check_gemv.py        (tests/test_kernels.py runs the same checks)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.native import extension  # noqa: E402
from kernels import reference  # noqa: E402

# (M, K, N): decode shapes, K not a multiple of 32, N not a
# multiple of the 4-row block, M up to 16; one row of x takes its own path (128 along k, then 32, then
# the masked rest)
SHAPES = [(1, 2048, 6144), (4, 2048, 8192), (16, 256, 96), (3, 100, 7), (1, 33, 5), (1, 20, 3), (1, 96, 11), (1, 200, 9),
          (8, 4096, 1030), (2, 8192, 256)]


def check(ext, seed: int = 0) -> list[tuple[tuple, float]]:
    """Max error of each shape, relative to the largest reference output; raises if out of tolerance."""
    g = torch.Generator().manual_seed(seed)
    results = []
    for M, K, N in SHAPES:
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, generator=g) / K**0.5).to(torch.bfloat16)
        b = torch.randn(N, generator=g).to(torch.bfloat16)
        for bias, act in ((None, None), (b, None), *((b, a) for a in reference.ACTIVATIONS if a)):
            want = reference.gemv(x, w, bias, act).float()
            got = ext.gemv(x, w, bias, reference.ACTIVATIONS[act]).float()
            err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
            # both accumulate in fp32 and round once to bf16; summation order differs, so allow a
            # couple of bf16 ulps (2^-8 relative each)
            if err > 2 ** -7:
                raise AssertionError(f"gemv {M}x{K}x{N} bias={bias is not None} act={act}: error {err:.2e}")
            results.append(((M, K, N, bias is not None, act), err))
    return results


if __name__ == "__main__":
    ext = extension()
    if ext is None:
        sys.exit("native gemv unavailable on this machine")
    print(f"isa: {ext.isa()}")
    for shape, err in check(ext):
        print(f"{shape}: max relative error {err:.2e}")
