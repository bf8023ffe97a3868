#!/usr/bin/env python3
"""bf16 matmuls on a CPU without AVX-512: PyTorch's bf16 F.linear beside cpugen's widened_linear
(fp32 GEMM over weight blocks widened into a reused buffer, cpugen/model/transformer.py), and a
square torch.mm in bf16 beside fp32, interleaved in each round; medians over rounds (min-max).

    python kernels/bench_widen.py [--rows 1,2,4,8,16,32,64,1024] [--n 8192 --k 2048] [--rounds 5]

It sets the row count above which the eager backend widens (runtime/eager.py, WIDEN_ABOVE_ROWS):
the first row count where widened_linear leads. On an AVX-512 CPU PyTorch's bf16 GEMM is oneDNN's
and this comparison does not apply (cpugen does not widen there)."""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpugen.host.cpu import cpu_info  # noqa: E402
from cpugen.model.transformer import widened_linear  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def fmt(xs: list[float], unit: str = "") -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})" + (f" {unit}" if unit else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,1024")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--square", type=int, default=1024, help="side of the square torch.mm (0: skip)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.n, a.k, generator=g).bfloat16()
    xs = {m: torch.randn(m, a.k, generator=g).bfloat16() for m in rows}
    res = {(m, route): [] for m in rows for route in ("bf16", "widened")}
    sq = {"bf16": [], "fp32": []}
    s = a.square
    if s:
        A, B = torch.randn(s, s, generator=g), torch.randn(s, s, generator=g)
    with torch.inference_mode():
        for _ in range(a.rounds):
            for m in rows:
                reps = max(1, min(20, 2048 // m))
                res[(m, "bf16")].append(timed(lambda: F.linear(xs[m], w), reps))
                res[(m, "widened")].append(timed(lambda: widened_linear(xs[m], w, None), reps))
            if s:
                for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                    a_, b_ = A.to(dt), B.to(dt)
                    sq[name].append(2 * s**3 / timed(lambda: torch.mm(a_, b_), 1) / 1e9)
    info = cpu_info()
    print(f"{info['cpu']} (AVX-512: {'yes' if info['avx512'] else 'no'}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; W ({a.n}, {a.k}) bf16, {a.rounds} rounds, medians (min-max)")
    print("| rows | bf16 F.linear ms | widened_linear ms | bf16 GFLOP/s | widened GFLOP/s | widened / bf16 speed |")
    print("|---|---|---|---|---|---|")
    lead = None
    for m in rows:
        b, wd = res[(m, "bf16")], res[(m, "widened")]
        flop = 2 * m * a.n * a.k / 1e9
        ratio = statistics.median(b) / statistics.median(wd)
        if lead is None and ratio > 1:
            lead = m
        print(f"| {m} | {fmt([x * 1e3 for x in b])} | {fmt([x * 1e3 for x in wd])} | "
              f"{flop / statistics.median(b):.1f} | {flop / statistics.median(wd):.1f} | {ratio:.2f}x |")
    print(f"widened_linear first leads at {lead} rows" if lead else "widened_linear never leads here")
    if s:
        print(f"torch.mm {s}^3: bf16 {fmt(sq['bf16'], 'GFLOP/s')}, fp32 {fmt(sq['fp32'], 'GFLOP/s')}, "
              f"fp32 / bf16 {statistics.median(sq['fp32']) / statistics.median(sq['bf16']):.0f}x")


if __name__ == "__main__":
    main()
