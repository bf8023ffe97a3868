"""This machine's limits with the threads in use: memory read bandwidth and bf16 matmul peak.

Decode at small batch is bound by streaming the weights (and, at long context and large batch,
the KV cache) from memory; prefill and large-batch decode by bf16 matrix throughput. A step's
roofline time is max(bytes moved / bandwidth, FLOPs / peak); efficiency = roofline / measured.

Bandwidth as the best of a few reads of a buffer far larger than the caches (torch's reductions,
and kernels/peak.cpp's read of several streams a thread where it runs), peak as a large bf16
matmul, each the median of repeats; beside them the register-only compute limit of each ISA
level. Cached per machine, thread count and torch version in ~/.cache/cpugen/roofline.json.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cpugen import knobs
from cpugen.host import cachefile
from cpugen.host.cpu import cpu_info
from cpugen.host.memory import empty_huge

def cache_file() -> Path:
    return knobs.current().cache / "roofline.json"


@dataclass
class Roofline:
    read_gbps: float  # memory read bandwidth, 1e9 B/s
    bf16_tflops: float  # bf16 matmul peak, 1e12 FLOP/s
    threads: int
    cpu: str
    torch_version: str
    read_spread: tuple[float, float] = (0.0, 0.0)  # min, max over repeats
    tflops_spread: tuple[float, float] = (0.0, 0.0)
    measured_at: float = 0.0
    # the hardware's compute limit at each ISA level this CPU has, register-only (kernels/peak.cpp):
    # {"avx2": TFLOP/s of fp32 FMA, "avx512": ..., "avx512_bf16": of vdpbf16ps}
    hw_tflops: dict = field(default_factory=dict)

    def step_time(self, bytes_moved: float, flop: float) -> float:
        return max(bytes_moved / (self.read_gbps * 1e9), flop / (self.bf16_tflops * 1e12))

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


READ_STREAMS = (4, 8)  # streams a thread of the native read


def readers(x: torch.Tensor) -> list:
    """Ways to read all of x (fp32, contiguous): torch's reductions (one stream a thread), and where
    kernels/peak.cpp runs, its read of 4 and of 8 streams a thread, as cpugen's kernels read weights
    (torch.sum read 0.80-0.90x as fast as those on 2 Zen 3 threads: docs/performance.md)."""
    ops = [lambda: x.sum(), lambda: x.amax(), lambda: x.view(torch.bfloat16).amax()]
    from cpugen.runtime import native

    ext = native.extension("peak") if cpu_info()["avx2"] else None
    if ext is not None:
        b, threads = x.view(torch.uint8), torch.get_num_threads()
        ops += [lambda s=s: ext.read(b, s, threads) for s in READ_STREAMS]
    return ops


def measure_bandwidth(repeats: int = 7, nbytes: int = 1 << 30) -> tuple[float, float, float]:
    """Median, min, max GB/s of reading `nbytes` (far beyond any cache) with the best of `readers`,
    from huge pages where the kernel gives them, as cpugen's weights and KV cache are. Each reader
    reads twice (a warm-up, then one timed pass), and only the fastest of those passes is repeated:
    the readers far behind cost a pass, not `repeats` (a bf16 `amax` read at 0.14x `x.sum()` on 2
    Xeon AMX cores and 0.46-0.55x on Zen 3, while the best readers there stay within 11% of each
    other, so one pass each picks among them well enough)."""
    x = empty_huge((nbytes // 4,), torch.float32)
    x.fill_(1.0)
    ops = readers(x)
    first = [_timed(op, 1)[0] for op in ops]
    best = min(range(len(ops)), key=first.__getitem__)
    ts = [first[best], *_timed(ops[best], repeats - 1)] if repeats > 1 else first[best:best + 1]
    del x
    gbps = [nbytes / t / 1e9 for t in ts]
    return statistics.median(gbps), min(gbps), max(gbps)


def measure_matmul(repeats: int = 7, n: int = 4096) -> tuple[float, float, float]:
    """Median, min, max TFLOP/s of an n x n x n bf16 matmul, through the route cpugen's bf16
    matmuls take here: PyTorch's bf16 GEMM, or, on CPUs without AVX-512 (where that runs about
    1 GFLOP/s), fp32 GEMM on widened blocks (model/transformer.py's widened_linear) at n/2."""
    from cpugen.model.transformer import widened_linear
    from cpugen.runtime.eager import widen_wanted

    if widen_wanted():
        n //= 2
        fn = widened_linear
    else:
        fn = lambda x, w, b: torch.mm(x, w.t())  # noqa: E731
    a = torch.randn(n, n).to(torch.bfloat16)
    b = torch.randn(n, n).to(torch.bfloat16)
    ts = _timed(lambda: fn(a, b, None), repeats)
    f = [2 * n**3 / t / 1e12 for t in ts]
    return statistics.median(f), min(f), max(f)


LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")  # x86 levels with a register-only limit
# what each level's chain adds to its checksum per instruction (x = y = 1): fp32 lanes of an FMA or
# a vdpbf16ps, the 16 x 16 elements of an AMX accumulator tile
LANES = {"avx2": 8, "avx512": 16, "avx512_bf16": 16, "amx": 256}
PEAK_ITERS = 1 << 24  # rounds of 12-16 chains a thread: tens of ms; acc (<= 2^24) stays exact in fp32
PEAK_ITERS_AMX = 1 << 20  # rounds of 6 tile chains (16 cycles an instruction): tens of ms likewise


def levels() -> list[str]:
    """The ISA levels this CPU has (at most CPUGEN_ISA's)."""
    info = cpu_info()
    return [lv for lv, ok in (("avx2", info["avx2"]), ("avx512", info["avx512"]),
                              ("avx512_bf16", info["avx512_bf16"]), ("amx", info["amx_bf16"])) if ok]


def level_limit(hw: dict[str, float], level: str | None) -> tuple[str | None, float | None]:
    """A level's hardware limit: the fastest register-only limit among the levels up to it (its
    instructions are all there), with the level whose instruction gives it. On Intel's Xeons
    vdpbf16ps issues at half AVX-512 FMA's rate (0.24 against 0.48 TFLOP/s on 2 cores), and cpugen's
    packed kernel multiplies with FMA there (gemv_bf16.h, kFmaAhead): the avx512_bf16 level's limit
    is then FMA's. On Zen 4 and Zen 5 vdpbf16ps' own."""
    if level not in LEVELS:
        return None, None
    have = [(v, lv) for lv, v in hw.items() if lv in LEVELS[:LEVELS.index(level) + 1] and v]
    if not have:
        return None, None
    v, lv = max(have)
    return lv, v


def run_level() -> str | None:
    """The level cpugen's bf16 matmuls run at here: AMX tiles (oneDNN's), vdpbf16ps (AVX512-BF16),
    AVX-512 fp32 FMA (PyTorch's bf16 GEMM widens to fp32), or AVX2 fp32 FMA (widened GEMM); None
    off x86."""
    have = levels()
    return have[-1] if have else None


def measure_hw(threads: int, repeats: int = 5) -> dict[str, float]:
    """TFLOP/s of each level's instruction in independent register-only chains on every thread
    (the best of `repeats`: the limit is what the units do when nothing slows them); {} where the
    kernel cannot run. Checks each run's checksum: a chain that skipped work is an error."""
    from cpugen.runtime import native

    ext = native.extension("peak")
    if ext is None:
        return {}
    out = {}
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lv in levels():
            iters = PEAK_ITERS_AMX if lv == "amx" else PEAK_ITERS
            best = 0.0
            for _ in range(repeats + 1):  # the first warms the units up (AVX-512 frequency licence)
                t0 = time.perf_counter()
                sums = ext.run(lv, iters, threads, 1.0, 1.0)
                t = time.perf_counter() - t0
                want = float(iters * LANES[lv] * ext.chains(lv))
                if any(x != want for x in sums):
                    raise RuntimeError(f"kernels/peak.cpp {lv}: checksums {sums}, expected {want} on every thread")
                best = max(best, threads * iters * ext.chains(lv) * ext.flop_per_instruction(lv) / t / 1e12)
            out[lv] = best
    finally:
        torch.set_num_threads(prev)
    return out


host_key = cachefile.host_key


def measure(threads: int | None = None, repeats: int = 7, nbytes: int = 1 << 30, n: int = 4096,
            hw: bool = True) -> Roofline:
    threads = threads or torch.get_num_threads()
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bw, bw_lo, bw_hi = measure_bandwidth(repeats, nbytes)
        tf, tf_lo, tf_hi = measure_matmul(repeats, n)
    finally:
        torch.set_num_threads(prev)
    return Roofline(bw, tf, threads, cpu_info()["cpu"], torch.__version__, (bw_lo, bw_hi), (tf_lo, tf_hi), time.time(),
                    measure_hw(threads) if hw else {})


def probe(threads: int | None = None) -> Roofline:
    """The same two limits in about a second (a 256 MiB read, a 2048-wide matmul, five repeats each):
    read right before and right after a timed row, so that its efficiencies are against the regime
    the machine was in while it ran (shared hosts move between regimes within minutes)."""
    return measure(threads, repeats=5, nbytes=256 << 20, n=2048, hw=False)


def between(a: Roofline, b: Roofline) -> Roofline:
    """The mean of two readings (before and after a row), with the spread of both."""
    return Roofline((a.read_gbps + b.read_gbps) / 2, (a.bf16_tflops + b.bf16_tflops) / 2, a.threads, a.cpu,
                    a.torch_version, (min(a.read_spread[0], b.read_spread[0]), max(a.read_spread[1], b.read_spread[1])),
                    (min(a.tflops_spread[0], b.tflops_spread[0]), max(a.tflops_spread[1], b.tflops_spread[1])),
                    b.measured_at, a.hw_tflops or b.hw_tflops)


def load_cached(threads: int) -> Roofline | None:
    d = cachefile.read(cache_file()).get(host_key(threads))
    if not d:
        return None
    d["read_spread"], d["tflops_spread"] = tuple(d["read_spread"]), tuple(d["tflops_spread"])
    return Roofline(**d)


def save(r: Roofline):
    cachefile.put(cache_file(), host_key(r.threads), r.to_dict())  # a read-only home: measured again next time


def get(threads: int, refresh: bool = False) -> Roofline:
    r = None if refresh else load_cached(threads)
    if r is None:
        r = measure(threads)
        save(r)
    return r


_hw: dict[int, dict] = {}


def hw_limits(threads: int, beaten: bool = False) -> dict[str, float]:
    """The register-only limits at `threads` threads: from the cache where it has them, else
    measured (about a second) and added to it. Such a limit can read low (another process on the
    cores while it was measured: 0.103 TFLOP/s cached against 0.203 on 2 Zen 3 threads) but never
    high, so where a figure `beaten` it, it is measured again and the larger of the two kept."""
    if beaten:
        fresh = measure_hw(threads)
        old = hw_limits(threads)
        _hw[threads] = {lv: max(old.get(lv, 0.0), fresh.get(lv, 0.0)) for lv in {*old, *fresh}}
        r = load_cached(threads)
        if r is not None:
            r.hw_tflops = _hw[threads]
            save(r)
        return _hw[threads]
    if threads not in _hw:
        r = load_cached(threads)
        if r is not None and r.hw_tflops:
            _hw[threads] = r.hw_tflops
        else:
            _hw[threads] = measure_hw(threads)
            if r is not None and _hw[threads]:
                r.hw_tflops = _hw[threads]
                save(r)
    return _hw[threads]
