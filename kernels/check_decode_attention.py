"""Checks the native decode attention against kernels/reference.py on random inputs, including
grouped-query heads and strided views of a larger cache, and times it against PyTorch's SDPA.

    python kernels/check_decode_attention.py     (tests/test_kernels.py runs the same checks)
"""

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.native import extension  # noqa: E402
from kernels import reference  # noqa: E402

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
    ext = extension("decode_attention")
    if ext is None:
        sys.exit("native decode attention unavailable on this machine")
    for shape, err in check(ext):
        print(f"{shape}: max relative error {err:.2e}")
    with torch.inference_mode():
        bench(ext)
