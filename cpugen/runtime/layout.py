"""Which layout the AVX2 level's weights take, by decode batch: measured once per host.

At the AVX2 level (CPUs without AVX-512, or CPUGEN_ISA=avx2) two kernels can run decode's skinny
matmuls: the gemv on the plain weights (kernels/gemv_avx2.h: four of W's rows a pass, four streams
a thread) and cpugen's packed layout's kernel (kernels/packed_avx2.h: at one and two rows a panel
read as four streams a thread). Which streams the faster is the CPU's prefetchers' doing, not the
instruction set's, and it changes with the rows of x: on 2 Zen 3 cores the packed kernel read as
one stream trailed the gemv at one row (0.84-0.93x) and was level at two; read as four streams it
leads at one row (1.09-1.13x) and two (1.22x), and at 4 rows as before (1.2x); on 2 Zen 5 cores capped to AVX2
the packed kernel streamed 95-97% of the read at one row against the gemv's 65-73%, and led at
every row count up to 16 (1.9x at 4 rows: `CPUGEN_ISA=avx2 python kernels/bench_gemv.py
--by-shape`, docs/performance.md).

So under CPUGEN_LAYOUT=auto the AVX2 level times both on the same weights, far beyond the caches,
at 1, 2 and 4 rows of x in interleaved rounds, once per host and build of the kernels (the
roofline's host key: CPU, threads, torch, page size; and the AVX2 module's build key), before the
model loads, and caches the figures in layout.json beside the roofline's limits. From them comes
`pack_above`, the largest decode batch that keeps the plain weights (pack_above()): 0 where the
packed kernel was at least as fast at every row count timed (packed at load), the largest row
count at which the gemv was faster where the packed kernel led at 4 rows (the weights stay plain
for those batches and their prefill; a larger batch packs them in place, and a smaller one after
it puts them back: eager.for_batch), and PACK_ABOVE where the gemv led at 4 rows too. The figures and the choice go into the run record
(`layout_choice`). CPUGEN_LAYOUT=plain or packed skips the timing.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from cpugen import knobs
from cpugen.host import cachefile
from cpugen.host.memory import empty_huge, release_freed, reset_peak_rss

ROWS = (1, 2, 4)  # rows of x timed: batch-1 decode, and small batches
# Where the gemv leads at 4 rows too (or nothing was timed), decode batches above this many
# sequences pack the weights: gptj-1b, 4 layers, 2 Zen 3 threads, 2 interleaved pairs of runs,
# decode at 32 sequences 196 / 164 tok/s packed against 157 / 150 through the gemv, at 16 level
# (153 / 135 against 156 / 147): docs/performance.md
PACK_ABOVE = 16
ROUNDS = 5
MIN_BYTES = 256 << 20  # of bf16 weights timed, or twice the last-level caches where they are larger
SHAPES = ((8192, 2048), (2048, 8192))  # (N, K): a wide and a long matrix, as an MLP's two

_chosen: dict[str, dict] = {}  # this process's choices by key: timed (or taken from rank 0) once, kept


def cache_file() -> Path:
    return knobs.current().cache / "layout.json"


def last_level_cache_bytes() -> int:
    """The CPU's last-level caches together (each shared cache counted once), from sysfs; 0 where
    it does not say."""
    seen, total = set(), 0
    for d in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index3"):
        try:
            key = (d / "shared_cpu_list").read_text().strip()
            size = (d / "size").read_text().strip()
        except OSError:
            continue
        if key in seen:
            continue
        seen.add(key)
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        total += int(size.rstrip("KMGkmg") or 0) * mult
    return total


def probe_matrices(nbytes: int | None = None) -> int:
    """How many of SHAPES' matrices (alternating) the timing streams: `nbytes` of them (default
    MIN_BYTES, or twice the last-level caches where that is more), at least two."""
    nbytes = nbytes or max(MIN_BYTES, 2 * last_level_cache_bytes())
    return max(2, -(-nbytes // (2 * SHAPES[0][0] * SHAPES[0][1])))


def probe_bytes(ext, count: int) -> int:
    """What the timing holds at once: `count` matrices plain and packed (with the packed form's
    padding)."""
    return sum(2 * (n * k + math.prod(ext.packed_shape(n, k))) for n, k in (SHAPES[i % 2] for i in range(count)))


def measure(ext, count: int | None = None, rounds: int = ROUNDS) -> dict:
    """GB/s of weights streamed by `ext`'s gemv (plain weights) and packed kernel (the same
    weights packed), at each of ROWS rows of x: medians of `rounds` interleaved rounds over `count`
    matrices (probe_matrices()), held in both forms until it returns."""
    count = count or probe_matrices()
    plain = [empty_huge(SHAPES[i % 2], torch.bfloat16).fill_(0.01 * (i + 1)) for i in range(count)]
    packed = []
    for w in plain:
        p = empty_huge(tuple(ext.packed_shape(*w.shape)), torch.bfloat16)
        ext.pack_into(w, p)
        packed.append(p)
    xs = {(m, k): torch.full((m, k), 0.5, dtype=torch.bfloat16) for m in ROWS for _, k in SHAPES}
    runs = {}
    for m in ROWS:
        runs[("gemv", m)] = lambda m=m: [ext.gemv(xs[(m, w.shape[1])], w, None) for w in plain]
        runs[("packed", m)] = lambda m=m: [ext.linear_packed(xs[(m, w.shape[1])], p, w.shape[0], None)
                                          for w, p in zip(plain, packed)]
    got = {k: [] for k in runs}
    total = sum(w.numel() * 2 for w in plain)
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm: pages touched, code loaded
        for _ in range(rounds):  # interleaved: a change of the host's regime reaches both kernels
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                got[k].append(total / (time.perf_counter() - t0) / 1e9)
    return {"bytes": total, "rounds": rounds,
            **{f"{kind}_gbps": {str(m): round(statistics.median(got[(kind, m)]), 2) for m in ROWS}
               for kind in ("gemv", "packed")}}


def valid(m) -> bool:
    """Whether `m` holds figures like measure()'s for every row count timed (a cache entry from
    another version, or a damaged one, is measured again)."""
    rows = {str(r) for r in ROWS}
    return (isinstance(m, dict) and all(isinstance(m.get(k), dict) and set(m[k]) == rows
                                        and all(isinstance(v, (int, float)) for v in m[k].values())
                                        for k in ("gemv_gbps", "packed_gbps")))


def pack_above(m: dict) -> int:
    """The largest decode batch that keeps the plain weights, by figures like measure()'s: 0 (pack
    at load) where the packed kernel was at least as fast at every row count timed; the largest
    row count at which the gemv was faster where the packed kernel was at least as fast at the
    largest; else (or without figures) PACK_ABOVE."""
    if not valid(m):
        return PACK_ABOVE
    slower = [r for r in ROWS if m["packed_gbps"][str(r)] < m["gemv_gbps"][str(r)]]
    return max(slower, default=0) if ROWS[-1] not in slower else PACK_ABOVE


def decided(m: dict, **more) -> dict:
    """A choice: `m` (figures, or none) with what follows from them: `pack_above` and `packed`
    (at load)."""
    n = pack_above(m)
    return {**m, "packed": n == 0, "pack_above": n, **more}


def key(ext, threads: int | None = None) -> str:
    from cpugen.runtime import native

    return f"avx2|{cachefile.host_key(threads or torch.get_num_threads())}|build={native.build_key('avx2')}"


def choose(ext, threads: int | None = None, log=lambda *a: None, room_bytes: int | None = None) -> dict:
    """The AVX2 level's layout on this host: this process's earlier choice, the cached figures, or
    new ones measured now (and cached) where their buffers fit `room_bytes` (else the plain layout,
    untimed for the rest of this process; a later one with room times it). Returns the figures with
    `pack_above` and `packed` (the choice: decided()) and `source` ("cached", "measured" or why not
    timed)."""
    k = key(ext, threads)
    if k in _chosen:
        return _chosen[k]
    m = cachefile.read(cache_file()).get(k)
    if valid(m):
        return adopt(decided(m, source="cached"), ext, threads)
    count = probe_matrices()
    held = probe_bytes(ext, count)
    if room_bytes is not None and held > room_bytes:
        why = (f"not timed: its {held / 2**30:.2f} GiB would pass the memory budget's room of "
               f"{max(room_bytes, 0) / 2**30:.2f} GiB")
        log(f"the AVX2 level keeps the plain layout for the gemv, {why}")
        return adopt(decided({}, source=why), ext, threads)
    log(f"timing the AVX2 gemv against the packed layout's kernel on {held / 2**30:.2f} GiB of their own "
        "weights (plain and packed), freed before the model loads, to pick its layout (once per host)")
    t0 = time.perf_counter()
    try:
        m = measure(ext, count)
    except (RuntimeError, MemoryError) as e:  # no memory for its buffers: the plain layout, untimed
        why = f"not timed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        log(f"the AVX2 level keeps the plain layout for the gemv, {why}")
        return adopt(decided({}, source=why), ext, threads)
    took = time.perf_counter() - t0
    release_freed()
    # its buffers are gone: the run's peak is the model's, as the plan predicts (where the kernel
    # cannot start the peak afresh, the record says the timing's buffers are in it)
    fresh = reset_peak_rss()
    cachefile.put(cache_file(), k, m)
    return adopt(decided(m, source="measured", timing_s=round(took, 2),
                         **({} if fresh else {"peak_rss_includes_timing": True})), ext, threads)


def adopt(choice: dict, ext, threads: int | None = None) -> dict:
    """Takes `choice` (this process's, or rank 0's in a tensor-parallel run) as this process's for
    `ext` at `threads`."""
    _chosen[key(ext, threads)] = dict(choice)
    return _chosen[key(ext, threads)]


def forget():
    """Drops this process's choices (a test changing the level, the knob or the cache)."""
    _chosen.clear()
