"""Microbenchmark: the roofline's ways of reading memory side by side (cpugen/perf/roofline.py's
`readers`: torch's reductions, one stream a thread, and kernels/peak.cpp's read of several streams a
thread), each round in a shuffled order over one buffer far beyond the caches; the median GB/s of
each and the median of its per-round ratio to x.sum() (this machine's bandwidth moves between
rounds, the ratios within a round much less).

    python kernels/bench_read.py [--rounds 15] [--mib 256]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.host.memory import empty_huge  # noqa: E402
from cpugen.perf import roofline  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    nbytes = a.mib << 20
    x = empty_huge((nbytes // 4,), torch.float32)
    x.fill_(1.0)
    ops = roofline.readers(x)
    names = ["x.sum()", "x.amax()", "bf16 amax"] + [f"native, {s} streams" for s in roofline.READ_STREAMS]
    gbps = {n: [] for n in names[:len(ops)]}
    for _ in range(a.rounds):
        order = list(range(len(ops)))
        random.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            ops[i]()
            gbps[names[i]].append(nbytes / (time.perf_counter() - t0) / 1e9)
    print(f"{torch.get_num_threads()} threads, {a.mib} MiB, {a.rounds} shuffled rounds")
    for n, v in gbps.items():
        ratio = statistics.median(g / s for g, s in zip(v, gbps["x.sum()"]))
        print(f"{n:>20}: {statistics.median(v):5.1f} GB/s ({min(v):.1f}-{max(v):.1f}), {ratio:.2f}x x.sum()")


if __name__ == "__main__":
    main()
