"""Microbenchmark: the native gemv (plain weights) and the packed-layout kernel (cpugen's packed
weights) against torch's F.linear and oneDNN's prepacked linear, on the weight matrices of
gptj-1b's 24 blocks (1.2e9 parameters, far beyond the caches), as decode reads them: every matrix
once per step. Reports GB/s of weights streamed (median over repeats, min-max).

    python kernels/bench_gemv.py [--rows 1,4,8,16] [--repeat 7] [--layers 24]
    python kernels/bench_gemv.py --by-shape [--rounds 20] [--layers 24]
    python kernels/bench_gemv.py --tflops --rows 16,32,128,512,2048 --repeat 3 --layers 1
    python kernels/bench_gemv.py --tflops --rows 16,32,128,512 --repeat 5 --resident

--tflops: TFLOP/s instead of GB/s, for the compute-bound sizes (prefill, large batches): the
packed kernel against oneDNN (its weights reordered with no batch hint, as the model's are) and
F.linear; the gemv takes at most 16 rows at AVX-512, 32 at AVX2 ('-' above); on CPUs without
AVX-512, also the widened fp32 GEMM and "cpugen plain", the packed kernel on the plain weights,
packed a chunk at a time as it goes (kernels/packed_avx2.h's linear_plain).

--resident: the same kernels on two 2048 x 2048 matrices (16 MiB: within a server CPU's last-level
cache), each called 8 times a repeat, so that the weights come from the caches, not memory: what
the kernels do where streaming the weights costs nothing, beside what they do from memory.

--by-shape: one row of x, the gemv and the packed kernel beside torch's sum (over an fp32 view of the
same weights, one call per matrix: a plain read) for each of gptj-1b's four matrix shapes, in a shuffled order within
each round; the read bandwidth is measured before and after every round, and the medians are taken
over the steady rounds (readings within 15%), split by this machine's two regimes.
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpugen.host.cpu import cap_libraries, cpu_info  # noqa: E402
from cpugen.host.memory import empty_huge  # noqa: E402
from cpugen.runtime.native import step_kernels  # noqa: E402
from cpugen.perf.roofline import measure_bandwidth  # noqa: E402
from cpugen.model.transformer import widened_linear  # noqa: E402
from cpugen.runtime.eager import widen_wanted  # noqa: E402


def _weight(n: int, k: int) -> torch.Tensor:
    """A random (n, k) bf16 weight on huge pages where the kernel gives them, as cpugen's are."""
    return empty_huge((n, k), torch.bfloat16).copy_(torch.randn(n, k).div_(k**0.5))


def _panels(ext, w: torch.Tensor) -> torch.Tensor:
    """w in cpugen's packed layout, on huge pages as the model's are."""
    p = empty_huge(tuple(ext.packed_shape(*w.shape)), torch.bfloat16)
    ext.pack_into(w, p)
    return p


def main():
    cap_libraries()  # under CPUGEN_ISA, F.linear and oneDNN run at that level too, as in a cpugen run
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--by-shape", action="store_true")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tflops", action="store_true")
    ap.add_argument("--resident", action="store_true")
    a = ap.parse_args()
    h, ffn = 2048, 8192
    if a.by_shape:
        return by_shape(h, ffn, a.layers, a.rounds)
    shapes = [(3 * h, h), (h, h), (ffn, h), (h, ffn)] * a.layers  # wqkv, wo, w_in, w_out
    if a.resident:  # two 8 MiB matrices, each called 8 times a repeat: the weights come from the caches
        shapes = [(h, h)] * 2
    ws = [_weight(n, k) for n, k in shapes]
    # oneDNN's bf16 reorder needs AVX-512 (or AVX-NE-CONVERT): '-' in its column elsewhere
    packed = ([torch.ops.mkldnn._reorder_linear_weight(w, None if a.tflops else 1) for w in ws]
              if cpu_info()["avx512"] else None)
    ext = step_kernels()  # the gemv at this CPU's level: AVX-512 (kernels/gemv_bf16.cpp) or AVX2 (kernels/avx2.cpp)
    panels = [_panels(ext, w) for w in ws] if ext and hasattr(ext, "packed_available") and ext.packed_available() else None
    if a.resident:
        ws, packed, panels = ws * 8, packed and packed * 8, panels and panels * 8
    nbytes = sum(w.numel() * 2 for w in ws)
    print(f"{torch.get_num_threads()} threads, {nbytes / 1e9:.2f} GB of bf16 weights, native isa "
          f"{ext.isa() if ext else 'unavailable'}"
          + (f" (packed: {ext.packed_isa()})" if ext and hasattr(ext, "packed_isa") else "")
          + f"; {'TFLOP/s' if a.tflops else 'GB/s of weights'}")
    names = ["F.linear", "oneDNN prepacked", "cpugen gemv", "cpugen packed"]
    if widen_wanted():  # no AVX-512: cpugen's route above the gemv's rows is the widened fp32 GEMM
        names.append("widened fp32 GEMM")
    if ext and hasattr(ext, "linear_plain"):  # the packed kernel on plain weights, packing as it goes
        names.append("cpugen plain")
    print(f"{'M':>3} " + " ".join(f"{n:>22}" for n in names))
    with torch.inference_mode():
        for M in map(int, a.rows.split(",")):
            xs = {k: torch.randn(M, k).to(torch.bfloat16) for k in (h, ffn)}
            impls = {"F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws]}
            if packed is not None:
                impls["oneDNN prepacked"] = lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none",
                                                                                        [], "") for w, p in zip(ws, packed)]
            if ext and M <= (ext.max_rows() if ext.isa() == "avx2" else 16):
                impls["cpugen gemv"] = lambda: [ext.gemv(xs[w.shape[1]], w, None) for w in ws]
            if "widened fp32 GEMM" in names:
                impls["widened fp32 GEMM"] = lambda: [widened_linear(xs[w.shape[1]], w, None) for w in ws]
            if "cpugen plain" in names:
                impls["cpugen plain"] = lambda: [ext.linear_plain(xs[w.shape[1]], w, None) for w in ws]
            if panels:
                impls["cpugen packed"] = lambda: [ext.linear_packed(xs[w.shape[1]], p, w.shape[0], None)
                                                  for w, p in zip(ws, panels)]
            res = {k: [] for k in impls}
            for _ in range(a.repeat):  # interleaved, so a change of regime hits every implementation
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    fn()
                    dt = time.perf_counter() - t0
                    res[name].append(nbytes * M / dt / 1e12 if a.tflops else nbytes / dt / 1e9)  # 2 M N K flops
            fmt = "{:6.3f} ({:5.3f}-{:5.3f})" if a.tflops else "{:6.1f} ({:4.1f}-{:4.1f})"
            cells = [fmt.format(statistics.median(res[k]), min(res[k]), max(res[k])) if k in res else "-" for k in names]
            print(f"{M:>3} " + " ".join(f"{c:>22}" for c in cells))


def by_shape(h: int, ffn: int, layers: int, rounds: int):
    ext = step_kernels()
    if ext is None:
        sys.exit("the native gemv did not build here (it needs AVX2 and FMA at least)")
    kinds = ("sum", "gemv", "packed") if hasattr(ext, "packed_available") and ext.packed_available() else ("sum", "gemv")
    groups = {f"{n}x{k}": [_weight(n, k) for _ in range(layers)]
              for n, k in [(3 * h, h), (h, h), (ffn, h), (h, ffn)]}  # wqkv, wo, w_in, w_out
    xs = {k: torch.randn(1, k).to(torch.bfloat16) for k in (h, ffn)}
    runs = {}  # (shape, "sum" | "gemv" | "packed") -> (bytes, fn)
    for name, ws in groups.items():
        nb = sum(w.numel() * 2 for w in ws)
        runs[(name, "sum")] = (nb, lambda ws=ws: [w.view(torch.float32).sum() for w in ws])
        runs[(name, "gemv")] = (nb, lambda ws=ws: [ext.gemv(xs[w.shape[1]], w, None) for w in ws])
        if "packed" in kinds:
            ps = [_panels(ext, w) for w in ws]
            runs[(name, "packed")] = (nb, lambda ws=ws, ps=ps: [ext.linear_packed(xs[w.shape[1]], p, w.shape[0], None)
                                                               for w, p in zip(ws, ps)])
    print(f"{torch.get_num_threads()} threads, one row of x, {layers} matrices of each shape; GB/s of weights")
    kept = []  # (mean reading, {key: GB/s}) of the steady rounds
    with torch.inference_mode():
        for r in range(rounds):
            before = measure_bandwidth(3)[0]
            order = list(runs) * 3
            random.shuffle(order)
            got = {k: [] for k in runs}
            for k in order:
                t0 = time.perf_counter()
                runs[k][1]()
                got[k].append(runs[k][0] / (time.perf_counter() - t0) / 1e9)
            after = measure_bandwidth(3)[0]
            med = {k: statistics.median(v) for k, v in got.items()}
            steady = abs(after / before - 1) <= 0.15
            if steady:
                kept.append(((before + after) / 2, med))
            print(f"round {r + 1}: read {before:.1f} / {after:.1f}{'' if steady else ' (not steady)'} | "
                  + " | ".join(f"{n} " + " ".join(f"{k} {med[(n, k)]:.1f}" for k in kinds) for n in groups), flush=True)
    for label, sel in (("below 45 GB/s", [x for x in kept if x[0] < 45]), ("45 GB/s and above", [x for x in kept if x[0] >= 45])):
        if not sel:
            continue
        read = statistics.median(x[0] for x in sel)
        print(f"{len(sel)} steady rounds read {label} (median {read:.1f}):")
        for n in groups:
            got = {k: statistics.median(x[1][(n, k)] for x in sel) for k in kinds}
            label = {"sum": "torch's sum", "gemv": "gemv", "packed": "packed"}
            print(f"  {n:>10}: " + ", ".join(f"{label[k]} {v:.1f} ({v / read:.0%} of read)" for k, v in got.items()))


if __name__ == "__main__":
    main()
