"""Checks the native decode attention and decode step against kernels/reference.py on random inputs,
including grouped-query heads, strided views of a larger cache, partial and no rotary, and times
them against PyTorch's SDPA.

    python kernels/check_decode_attention.py     (tests/test_kernels.py runs the same checks)
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# kernels/ is a directory of sources beside their checks, not a package (the top-level name
# `kernels` is Hugging Face's, which transformers requires): its scripts import each other by file
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpugen.runtime.native import extension  # noqa: E402
import reference  # noqa: E402

# (B, nh, nkv, S, S_max, hd)
SHAPES = [(1, 16, 16, 135, 200, 128), (3, 8, 2, 77, 77, 64), (2, 32, 8, 1, 10, 128), (4, 4, 1, 513, 600, 256)]


def check(ext, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, nh, nkv, S, S_max, hd in SHAPES:
        kc = torch.randn(B, nkv, S_max, hd, generator=g).to(torch.bfloat16)
        vc = torch.randn(B, nkv, S_max, hd, generator=g).to(torch.bfloat16)
        q = (torch.randn(B, nh, hd, generator=g) * 2).to(torch.bfloat16)
        k, v = kc[:, :, :S], vc[:, :, :S]  # the cache's filled prefix: a strided view
        want = reference.decode_attention(q, k, v).float()
        got = ext.decode_attention(q, k, v).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 2 ** -6:  # bf16 scores inside vs fp32 reference: a few bf16 ulps
            raise AssertionError(f"decode_attention {(B, nh, nkv, S, S_max, hd)}: error {err:.2e}")
        out.append(((B, nh, nkv, S, hd), err))
    return out


# (B, nh, nkv, index, S_max, hd, rd): GPT-J's partial rotary, Llama's full one with GQA, none (OPT)
STEP_SHAPES = [(1, 16, 16, 134, 200, 128, 64), (3, 8, 2, 76, 77, 64, 64), (2, 32, 8, 0, 10, 128, 128),
               (4, 4, 1, 512, 600, 256, 0), (5, 12, 12, 40, 64, 64, 32)]


def check_step(ext, seed: int = 0):
    """decode_step against the reference: the output within a few bf16 ulps, the cache writes
    exact (the same fp32 operations, rounded the same way), the rest of the cache untouched."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, nh, nkv, index, S_max, hd, rd in STEP_SHAPES:
        kc = torch.randn(B, nkv, S_max, hd, generator=g).to(torch.bfloat16)
        vc = torch.randn(B, nkv, S_max, hd, generator=g).to(torch.bfloat16)
        qkv = (torch.randn(B, (nh + 2 * nkv) * hd, generator=g) * 2).to(torch.bfloat16)
        angle = torch.rand(B, rd // 2, generator=g) * 100  # positions up to ~100 rad
        cos, sin = angle.cos(), angle.sin()
        kw, vw = kc.clone(), vc.clone()
        want = reference.decode_step(qkv, cos, sin, kw, vw, index, nh, rd).float()
        got = ext.decode_step(qkv, cos, sin, kc, vc, index, nh, rd).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 2 ** -6:
            raise AssertionError(f"decode_step {(B, nh, nkv, index, S_max, hd, rd)}: error {err:.2e}")
        if not (torch.equal(kc, kw) and torch.equal(vc, vw)):
            raise AssertionError(f"decode_step {(B, nh, nkv, index, S_max, hd, rd)}: cache differs from the reference")
        out.append(((B, nh, nkv, index, hd, rd), err))
    return out


def bench(ext):
    for B, S in [(1, 135), (1, 1100), (16, 160), (32, 1100)]:
        nh, hd = 16, 128
        kc = torch.randn(B, nh, S + 50, hd).to(torch.bfloat16)
        vc = torch.randn_like(kc)
        k, v = kc[:, :, :S], vc[:, :, :S]
        q = torch.randn(B, nh, hd).to(torch.bfloat16)
        fns = {"sdpa": lambda: F.scaled_dot_product_attention(q[:, :, None], k, v),
               "cpugen": lambda: ext.decode_attention(q, k, v)}
        res = {}
        for name, f in fns.items():
            f()
            t0 = time.perf_counter()
            for _ in range(20):
                f()
            res[name] = (time.perf_counter() - t0) / 20
        gb = 2 * k.numel() * 2 / 1e9
        print(f"B={B:>2} S={S:>5}: sdpa {res['sdpa'] * 1e6:8.0f} us, cpugen {res['cpugen'] * 1e6:8.0f} us "
              f"({gb / res['cpugen']:.1f} GB/s of K and V)")


if __name__ == "__main__":
    from cpugen.runtime.native import level

    # the kernel at this CPU's level: vdpbf16ps (kernels/decode_attention.cpp) or AVX2 (kernels/avx2.cpp)
    ext = extension("decode_attention" if level() == "avx512_bf16" else "avx2") if level() else None
    if ext is None:
        sys.exit("native decode attention unavailable on this machine")
    for shape, err in check(ext):
        print(f"{shape}: max relative error {err:.2e}")
    for shape, err in check_step(ext):
        print(f"step {shape}: max relative error {err:.2e}, cache writes exact")
    with torch.inference_mode():
        bench(ext)
