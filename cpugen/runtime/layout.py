"""Which layout the AVX2 level's weights take at load: measured once per host.

At the AVX2 level (CPUs without AVX-512, or CPUGEN_ISA=avx2) two kernels can run decode's skinny
matmuls: the gemv on the plain weights (kernels/gemv_avx2.h: four of W's rows a pass, four streams
a thread) and cpugen's packed layout's kernel (kernels/packed_avx2.h: one stream a thread). Which
streams the faster is the CPU's prefetchers' doing, not the instruction set's: on 2 Zen 3 cores the
gemv led at 1 and 4 rows of x, and packing paid only for decode batches above 16
(eager.AVX2_PACK_ABOVE); on 2 Zen 5 cores capped to AVX2 the packed kernel streamed 95-97% of the
read at one row against the gemv's 65-73%, and led at every row count up to 16 (1.9x at 4 rows:
`CPUGEN_ISA=avx2 python kernels/bench_gemv.py --by-shape`, docs/performance.md).

So under CPUGEN_LAYOUT=auto the AVX2 level times both on the same weights, far beyond the caches,
at 1 and 4 rows of x in interleaved rounds, once per host (CPU, threads, torch, page size: the
roofline's key) and caches the figures in layout.json beside the roofline's limits. The weights
are packed at load where the packed kernel is the faster at both row counts; else they stay plain
for the gemv and are packed for batches above AVX2_PACK_ABOVE, as before. The figures and the
choice go into the run record (`layout_choice`). CPUGEN_LAYOUT=plain or packed skips the
measurement.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from cpugen import knobs
from cpugen.host.memory import empty_huge, reset_peak_rss
from cpugen.perf import roofline

ROWS = (1, 4)  # rows of x timed: batch-1 decode, and a small batch
ROUNDS = 5
MIN_BYTES = 256 << 20  # of bf16 weights timed, or twice the last-level caches where they are larger
SHAPES = ((8192, 2048), (2048, 8192))  # (N, K): a wide and a long matrix, as an MLP's two

_chosen: dict[str, dict] = {}  # this process's choices by host key: made (or adopted) once, kept
_current: dict | None = None  # the last one, for the record


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


def probe_bytes() -> int:
    return max(MIN_BYTES, 2 * last_level_cache_bytes())


def measure(ext, nbytes: int | None = None, rounds: int = ROUNDS) -> dict:
    """GB/s of weights streamed by `ext`'s gemv (plain weights) and packed kernel (the same
    weights packed), at each of ROWS rows of x: medians of `rounds` interleaved rounds. Both forms
    are held until it returns (`nbytes` each), before the model loads."""
    nbytes = nbytes or probe_bytes()
    per = 2 * SHAPES[0][0] * SHAPES[0][1]
    count = max(2, -(-nbytes // per))
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
    total = count * per
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


def packs_at_load(m: dict) -> bool:
    """Whether figures like measure()'s say to pack at load: the packed kernel at least as fast at
    every row count timed (no figures: no)."""
    return bool(m.get("gemv_gbps")) and all(m["packed_gbps"][r] >= m["gemv_gbps"][r] for r in m["gemv_gbps"])


def _key(threads: int) -> str:
    return f"avx2|{roofline.host_key(threads)}"


def choose(ext, threads: int | None = None, log=lambda *a: None, room_bytes: int | None = None) -> dict:
    """The AVX2 level's layout on this host: this process's earlier choice, the cached figures, or
    new ones measured now (and cached) where their buffers fit `room_bytes` (else the plain layout,
    untimed). Returns the figures with `packed` (the choice) and `source` ("cached", "measured" or
    why not), and keeps them for the record."""
    global _current
    key = _key(threads or torch.get_num_threads())
    if key in _chosen:
        _current = _chosen[key]
        return _current
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    m = data.get(key)
    if isinstance(m, dict) and {"gemv_gbps", "packed_gbps"} <= set(m):
        source = "cached"
    elif room_bytes is not None and 2 * probe_bytes() > room_bytes:
        why = (f"not timed: its {2 * probe_bytes() / 2**30:.2f} GiB would pass the memory budget's room of "
               f"{max(room_bytes, 0) / 2**30:.2f} GiB")
        log(f"the AVX2 level keeps the plain layout for the gemv, {why}")
        return adopt({"packed": False, "source": why}, threads)
    else:
        nbytes = probe_bytes()
        log(f"timing the AVX2 gemv against the packed layout's kernel on {2 * nbytes / 2**30:.2f} GiB of their own "
            "weights (plain and packed), freed before the model loads, to pick its layout (once per host, about a "
            "second)")
        m, source = measure(ext, nbytes), "measured"
        reset_peak_rss()  # its buffers are gone: the run's peak is the model's, as the plan predicts
        data[key] = m
        try:
            cache_file().parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file().with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(cache_file())
        except OSError:
            pass  # a read-only cache: measured again next time
    return adopt({**m, "packed": packs_at_load(m), "source": source}, threads)


def adopt(choice: dict, threads: int | None = None) -> dict:
    """Takes `choice` (this process's, or rank 0's in a tensor-parallel run) as this process's."""
    global _current
    _current = _chosen[_key(threads or torch.get_num_threads())] = dict(choice)
    return _current


def current() -> dict | None:
    """This process's choice (None where none was made: not the AVX2 level, or CPUGEN_LAYOUT set)."""
    return _current


def forget():
    """Drops this process's choices (a test changing the level, the knob or the cache)."""
    global _current
    _chosen.clear()
    _current = None
