"""Microbenchmark: the small ops of a decode step, cpugen's kernels against the torch ops they
replace: greedy decoding's argmax over the vocabulary (kernels/argmax.h against torch.argmax) and
the norms (kernels/norm.h against torch's layer_norm and model.py's RMSNorm), warm (the op called
again and again) and cold (each call right after reading 256 MB, as a decode step leaves the caches
after streaming the weights). Calls are interleaved op by op; medians with min-max over the calls.

    python kernels/bench_step_ops.py [--calls 50] [--vocab 50400] [--hidden 2048]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.runtime import native  # noqa: E402


def rms_torch(x, w, eps):  # model.py's Norm.reference for RMSNorm
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=50400)
    ap.add_argument("--hidden", type=int, default=2048)
    a = ap.parse_args()
    ext = native.step_kernels()  # the level's argmax and norms (gemv_bf16 with AVX-512, avx2 without)
    if ext is None:
        sys.exit(f"no native kernels here: {native.why_not('avx2') or native.why_not() or 'CPUGEN_NATIVE=0'}")
    V, h = a.vocab, a.hidden
    w, b = torch.randn(h).bfloat16(), torch.randn(h).bfloat16()
    ops = {}
    for rows in (1, 4, 32):
        lg = torch.randn(rows, V).bfloat16()
        ops[f"argmax {rows} x {V}"] = (lambda lg=lg: torch.argmax(lg, -1), lambda lg=lg: ext.argmax(lg))
    for rows in (1, 4, 16):
        x = torch.randn(rows, h).bfloat16()
        ops[f"layernorm {rows} x {h}"] = (lambda x=x: F.layer_norm(x, (h,), w, b, 1e-5),
                                          lambda x=x: ext.norm(x, w, b, 1e-5, False))
        ops[f"rmsnorm {rows} x {h}"] = (lambda x=x: rms_torch(x, w, 1e-5), lambda x=x: ext.norm(x, w, None, 1e-5, True))
    big = torch.ones(64 << 20)  # 256 MB
    print(f"{torch.get_num_threads()} threads; us a call, median (min-max) of {a.calls} interleaved calls")
    print("| op | torch warm | cpugen warm | torch cold | cpugen cold | cold: torch / cpugen |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (ref, mine) in ops.items():
            assert torch.equal(ref(), mine()) if name.startswith("argmax") else True
            t = {k: [] for k in ("tw", "mw", "tc", "mc")}
            for _ in range(a.calls):
                for key, fn, cold in (("tw", ref, False), ("mw", mine, False), ("tc", ref, True), ("mc", mine, True)):
                    if cold:
                        big.sum()
                    else:
                        fn()
                    t0 = time.perf_counter()
                    fn()
                    t[key].append((time.perf_counter() - t0) * 1e6)
            fmt = lambda v: f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"  # noqa: E731
            print(f"| {name} | {fmt(t['tw'])} | {fmt(t['mw'])} | {fmt(t['tc'])} | {fmt(t['mc'])} | "
                  f"{statistics.median(t['tc']) / statistics.median(t['mc']):.1f}x |", flush=True)


if __name__ == "__main__":
    main()
