"""Checks the native gemv and the packed-layout kernel against kernels/reference.py on random
inputs of awkward shapes.

    python kernels/check_gemv.py        (tests/test_kernels.py runs the same checks)
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# kernels/ is a directory of sources beside their checks, not a package (the top-level name
# `kernels` is Hugging Face's, which transformers requires): its scripts import each other by file
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpugen.runtime.native import extension  # noqa: E402
import reference  # noqa: E402

# (M, K, N): decode shapes, K not a multiple of 32, N not a
# multiple of the 4-row block, M up to 16; one row of x takes its own path (128 along k, then 32, then
# the masked rest)
SHAPES = [(1, 2048, 6144), (4, 2048, 8192), (16, 256, 96), (3, 100, 7), (1, 33, 5), (1, 20, 3), (1, 96, 11), (1, 200, 9),
          (8, 4096, 1030), (2, 8192, 256)]


# (M, K, N) for the packed layout: one row (K with an even and an odd count of pairs; the AVX2
# kernel's panel read in 4 segments where the pairs divide by 4, as at K = 2048 and 1032, a last
# panel of 6 outputs at 1032, in one stream where not, as at 66 and 2), two rows (in 4 segments,
# steps of 8 pairs and a ragged last one at K = 1048 and 520; in the 6-row kernel's chunks at 130), the micro-
# kernels' 6 rows and the ragged groups past them (AVX2: 8 and 32 rows end in two groups of 4),
# prefill's hundreds of rows (past the 240-row block); N off the 64-wide panels (a last panel of 1-15 outputs: a quarter of the AVX2
# kernel's); K over one 256-pair chunk (sums carried between chunks) and K with an odd count of pairs;
# K so wide that the AVX2 kernel's widened block of x holds fewer rows (232 at K = 9000). The AMX
# tiles take K a multiple of 32: one tile of x (1-16 rows) and blocks past it (a last block of one
# row, an odd count of blocks), groups of rows whose x fills 1 MB (128 at K 4096: 300 rows end in
# a group of 44), K past one 4096-k chunk (sums carried between chunks, a ragged last chunk of
# 64), at 3 and 40 rows (packed_amx.h)
PACKED_SHAPES = [(1, 2048, 6144), (1, 2, 1), (1, 66, 100), (1, 1032, 70), (2, 130, 64), (2, 1048, 200), (2, 520, 64),
                 (6, 514, 129), (7, 1030, 200),
                 (16, 2048, 2048), (130, 600, 300), (300, 256, 70), (5, 1024, 72), (33, 520, 136), (250, 9000, 70),
                 (17, 64, 65), (48, 2080, 130), (520, 96, 200), (8, 520, 130), (32, 1030, 72),
                 (300, 4096, 70), (40, 4160, 70), (3, 8256, 70)]


def _cases(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    for M, K, N in shapes:
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        w = (torch.randn(N, K, generator=g) / K**0.5).to(torch.bfloat16)
        b = torch.randn(N, generator=g).to(torch.bfloat16)
        for bias, act in ((None, None), (b, None), *((b, a) for a in reference.ACTIVATIONS if a)):
            yield (M, K, N), x, w, bias, act


def _compare(what, got, want, M, K, N, bias, act):
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6)).item()
    # both accumulate in fp32 and round once to bf16; summation order differs, so allow a couple
    # of bf16 ulps (2^-8 relative each)
    if err > 2 ** -7:
        raise AssertionError(f"{what} {M}x{K}x{N} bias={bias is not None} act={act}: error {err:.2e}")
    return ((M, K, N, bias is not None, act), err)


def check_packed(ext, seed: int = 0) -> list[tuple[tuple, float]]:
    """As check(), for pack_into + linear_packed (cpugen's packed layout)."""
    results, packed = [], {}
    for (M, K, N), x, w, bias, act in _cases(PACKED_SHAPES, seed):
        if (M, K, N) not in packed:
            packed = {(M, K, N): torch.empty(ext.packed_shape(N, K), dtype=torch.bfloat16)}
            ext.pack_into(w, packed[(M, K, N)])
        got = ext.linear_packed(x, packed[(M, K, N)], N, bias, reference.ACTIVATIONS[act])
        results.append(_compare("packed", got, reference.gemv(x, w, bias, act), M, K, N, bias, act))
    return results


def check_plain(ext, seed: int = 0) -> list[tuple[tuple, float]]:
    """As check_packed(), for linear_plain: the packed layout's kernel on the plain weight, packed a
    chunk at a time as it goes (kernels/packed_avx2.h), at the same shapes."""
    return [_compare("plain", ext.linear_plain(x, w, bias, reference.ACTIVATIONS[act]), reference.gemv(x, w, bias, act),
                     M, K, N, bias, act)
            for (M, K, N), x, w, bias, act in _cases(PACKED_SHAPES, seed)]


def check(ext, seed: int = 0, shapes=None, name: str = "gemv") -> list[tuple[tuple, float]]:
    """Max error of each shape, relative to the largest reference output; raises if out of tolerance."""
    results = []
    for (M, K, N), x, w, bias, act in _cases(SHAPES if shapes is None else shapes, seed):
        got = ext.gemv(x, w, bias, reference.ACTIVATIONS[act])
        results.append(_compare(name, got, reference.gemv(x, w, bias, act), M, K, N, bias, act))
    return results


# its 1-32 rows: k off its 16; one row, four rows of W a pass: N split across threads off the 4, k
# past L1; above 4 rows, x in blocks of 4 and a ragged last block, W's chunks (64 rows at k = 1024,
# 8 at k = 8200) ragged at the ends of each thread's range
AVX2_SHAPES = [s for s in SHAPES if s[0] <= 32] + [(4, 17, 9), (2, 4096, 130), (1, 8200, 67), (32, 1024, 130),
                                                   (7, 8200, 67), (13, 48, 5)]


def check_avx2(ext, seed: int = 0) -> list[tuple[tuple, float]]:
    """As check(), for the AVX2 gemv (kernels/gemv_avx2.h, bound in kernels/avx2.cpp; 1-32 rows of x)."""
    return check(ext, seed, AVX2_SHAPES, "gemv_avx2")


if __name__ == "__main__":
    avx2 = extension("avx2")
    if avx2 is not None:
        for shape, err in check_avx2(avx2):
            print(f"gemv_avx2 {shape}: max relative error {err:.2e}")
        for shape, err in check_packed(avx2):
            print(f"packed_avx2 {shape}: max relative error {err:.2e}")
        for shape, err in check_plain(avx2):
            print(f"plain_avx2 {shape}: max relative error {err:.2e}")
    ext = extension()
    if ext is None:
        sys.exit(0 if avx2 is not None else "native gemv unavailable on this machine")
    print(f"isa: {ext.isa()}")
    for shape, err in check(ext):
        print(f"gemv {shape}: max relative error {err:.2e}")
    if ext.packed_available():
        for shape, err in check_packed(ext):
            print(f"packed {shape}: max relative error {err:.2e}")
