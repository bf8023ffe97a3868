"""Microbenchmark: the native gemv against torch's F.linear and oneDNN's prepacked linear, on the
weight matrices of gptj-1b's 24 blocks (1.2e9 parameters, far beyond the caches), as decode reads
them: every matrix once per step. Reports GB/s of weights streamed (median over repeats, min-max).

    python kernels/bench_gemv.py [--rows 1,4,8,16] [--repeat 7] [--layers 24]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.memory import empty_huge  # noqa: E402
from cpugen.native import extension  # noqa: E402


def _weight(n: int, k: int) -> torch.Tensor:
    """A random (n, k) bf16 weight on huge pages where the kernel gives them, as cpugen's are."""
    return empty_huge((n, k), torch.bfloat16).copy_(torch.randn(n, k).div_(k**0.5))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layers", type=int, default=24)
    a = ap.parse_args()
    h, ffn = 2048, 8192
    shapes = [(3 * h, h), (h, h), (ffn, h), (h, ffn)] * a.layers  # wqkv, wo, w_in, w_out
    ws = [_weight(n, k) for n, k in shapes]
    nbytes = sum(w.numel() * 2 for w in ws)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
    ext = extension()
    print(f"{torch.get_num_threads()} threads, {nbytes / 1e9:.2f} GB of bf16 weights, native isa "
          f"{ext.isa() if ext else 'unavailable'}")
    print(f"{'M':>3} {'F.linear':>22} {'oneDNN prepacked':>22} {'cpugen gemv':>22}")
    with torch.inference_mode():
        for M in map(int, a.rows.split(",")):
            xs = {k: torch.randn(M, k).to(torch.bfloat16) for k in (h, ffn)}
            impls = {
                "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
                "oneDNN prepacked": lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                                             for w, p in zip(ws, packed)],
            }
            if ext:
                impls["cpugen gemv"] = lambda: [ext.gemv(xs[w.shape[1]], w, None) for w in ws]
            res = {k: [] for k in impls}
            for _ in range(a.repeat):  # interleaved, so a change of regime hits every implementation
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    fn()
                    res[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
            cells = [f"{statistics.median(v):6.1f} ({min(v):4.1f}-{max(v):4.1f})" for v in res.values()]
            print(f"{M:>3} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
