"""The batch-size probe: the real largest batch that does not run out of memory.

Each try runs the real workload (build or load the weights, allocate the cache for prompt +
generation, prefill, a few decode steps) in a child process under a hard memory limit, so a try
that runs out of memory dies alone; the probe binary-searches between 1 and twice the planner's
answer and sets each try's measured peak beside the planner's prediction.

The limit, by what the host allows: a cgroup memory group of its own (v1 memory.limit_in_bytes or
v2 memory.max; the kernel's OOM killer stops the child), else RLIMIT_DATA (allocations past it
fail), else a watchdog that kills the child when its resident memory passes the limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from cpugen.host.cgroup import Limit, make_limit

@dataclass
class Try:
    batch_size: int
    fits: bool
    predicted_peak_bytes: int
    measured_peak_bytes: int | None  # VmHWM of the child; None when it died
    seconds: float
    why: str = ""  # for a try that did not fit: how it ended

    @property
    def ratio(self) -> float | None:
        return self.predicted_peak_bytes / self.measured_peak_bytes if self.measured_peak_bytes else None


# --- one try ---------------------------------------------------------------------------------------------
CHILD = """
import json, sys
from cpugen.perf.measure import RunSpec, run
from cpugen.runtime import distributed
a = json.loads(sys.argv[1])
if a["tp"] > 1:  # one rank of a split try: its environment names the group
    distributed.init(a["tp"], a["tp_timeout"])
ok = False
try:
    rec = run(RunSpec(a["model"], a["batch"], a["prompt_len"], a["gen_len"], a["layers"], a["backend"], a["dtype"],
                      quiet=True, memory_budget=a["budget"], decode_steps=a["decode_steps"], check_fit=False,
                      threads=a["threads"], roofline=False))  # its memory is the answer: no limits read around it
    ok = True
finally:
    distributed.finish(ok)
from cpugen.host.memory import peak_rss_bytes
print(json.dumps({"peak": peak_rss_bytes(), "predicted": rec.extra["predicted_peak_bytes"]}))
if a["tp"] > 1:
    distributed.exit_rank(0)
"""


def run_try(args: dict, batch: int, limit: Limit, timeout: float = 1800) -> tuple[bool, int | None, str]:
    """(fits, measured peak, why) for one batch in a child process under `limit`."""
    return run_split_try(args, batch, [limit], timeout)


def run_split_try(args: dict, batch: int, limits: list[Limit], timeout: float = 1800) -> tuple[bool, int | None, str]:
    """(fits, the largest rank's measured peak, why) for one batch run by len(limits) ranks on this
    host, each a child process under its own limit; the first rank to fail stops the others (their
    collectives would wait for it)."""
    import threading

    from cpugen.runtime.launcher import _free_port

    tp = len(limits)
    payload = json.dumps({**args, "batch": batch, "tp": tp})
    port = _free_port()
    procs, whys, errs, stopped = [], [None] * tp, [], set()
    try:
        for r, limit in enumerate(limits):
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if tp > 1:
                env.update(RANK=str(r), WORLD_SIZE=str(tp), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(tp),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            errs.append(tempfile.TemporaryFile("w+"))
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, payload], stdout=subprocess.PIPE,
                                          stderr=errs[r], text=True, preexec_fn=limit.preexec, env=env))

        def watch(r):
            whys[r] = limits[r].watch(procs[r])
            if procs[r].returncode != 0:
                for q, p in enumerate(procs):  # a rank failed: the others would wait for it in a collective
                    if p.poll() is None:
                        stopped.add(q)
                        p.kill()

        watchers = [threading.Thread(target=watch, args=(r,)) for r in range(tp)]
        for t in watchers:
            t.start()
        for t in watchers:
            t.join(timeout)
        outs = [p.stdout.read() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        texts = []
        for f in errs:
            f.seek(0)
            texts.append(f.read())
            f.close()
    if all(p.returncode == 0 for p in procs):
        return True, max(json.loads(o.strip().splitlines()[-1])["peak"] for o in outs), ""
    # why the first rank that failed by itself did (the others were stopped, or failed after it)
    own = [r for r in range(tp) if r not in stopped and procs[r].returncode != 0]
    at = (lambda r: "") if tp == 1 else (lambda r: f" (rank {r})")  # noqa: E731
    for r in own:
        if whys[r]:
            return False, None, whys[r] + at(r)
    for r in own:
        if procs[r].returncode == -signal.SIGKILL:
            return False, None, "killed (SIGKILL: out of memory)" + at(r)
    for r in own:
        lines = [x for x in texts[r].strip().splitlines() if x.strip()]
        last = lines[-1] if lines else f"exit status {procs[r].returncode}"
        if "memory" in texts[r].lower() or "alloc" in texts[r].lower():
            return False, None, f"out of memory: {last[:160]}" + at(r)
    r = own[0] if own else 0
    lines = [x for x in texts[r].strip().splitlines() if x.strip()]
    raise RuntimeError(f"batch {batch} failed for a reason other than memory{at(r)}: "
                       f"{(lines[-1] if lines else f'exit status {procs[r].returncode}')[:300]}")


BASELINE = """
import json
import cpugen.perf.measure
from cpugen.runtime import planner
from cpugen.host.memory import rss_file_bytes
print(json.dumps([planner.runtime_overhead(), rss_file_bytes()]))
"""


def child_baseline() -> tuple[int, int]:
    """(runtime overhead, file-backed bytes) as a fresh process measures them: a probe running in a
    large process (a test session) must not charge its own memory to its children."""
    out = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True)
    overhead, file_backed = json.loads(out.stdout.strip().splitlines()[-1])
    return overhead, file_backed


def probe(cfg, model_spec: str, prompt_len: int, gen_len: int, limit_bytes: int, backend: str = "eager",
          dtype: str = "bfloat16", decode_steps: int = 3, threads: int | None = None, prefer: str = "auto",
          max_batch: int | None = None, on_try=None, tp: int = 1, tp_timeout: float = 120.0) -> dict:
    """Binary search for the largest batch that runs under limit_bytes; returns a report dict. With
    `tp` ranks, limit_bytes is the host's: each rank runs under its own limit of limit_bytes / tp,
    and a try's peak is the largest rank's."""
    import torch

    from cpugen.model import shard
    from cpugen.runtime import planner

    shard.check(cfg, tp)
    itemsize = torch.finfo(getattr(torch, dtype)).bits // 8
    rank_limit = limit_bytes // tp
    budget = f"{rank_limit}B"  # each rank's own
    overhead, file_backed = child_baseline()  # the children's runtime, not this process's
    split = dict(tp=tp, ranks_per_host=1)  # each rank's budget is its own limit
    plan = planner.plan(cfg, prompt_len, gen_len, itemsize, backend, memory_budget=budget, overhead=overhead,
                        file_backed=file_backed, **split)
    args = dict(model=model_spec, layers=cfg.n_layer, prompt_len=prompt_len, gen_len=gen_len, backend=backend,
                dtype=dtype, budget=budget, decode_steps=decode_steps, threads=threads, tp_timeout=tp_timeout)
    from cpugen.runtime import native

    native.build_all()  # build (or load) the native kernels here, not in a child under the limit
    limits = [make_limit(rank_limit, prefer) for _ in range(tp)]
    limit = limits[0]
    tries: list[Try] = []

    def attempt(b: int) -> bool:
        t0 = time.perf_counter()
        pred = planner.plan(cfg, prompt_len, gen_len, itemsize, backend, memory_budget=budget, batch_size=b,
                            overhead=plan.overhead_bytes, file_backed=plan.file_backed_bytes,
                            **split).predicted_peak_bytes
        fits, peak, why = run_split_try(args, b, limits)
        t = Try(b, fits, pred, peak, time.perf_counter() - t0, why)
        tries.append(t)
        if on_try:
            on_try(t)
        return fits

    try:
        hi = max(2 * plan.batch_size, 2)
        if max_batch:
            hi = min(hi, max_batch)
        lo, top = 0, hi  # lo: largest batch known to fit; top: smallest known not to
        if attempt(hi):
            lo = hi  # fits even at the top of the range: the probe's answer is a lower bound
        first = True
        while top - lo > 1:
            # the planner's answer first (the most telling try), then plain bisection
            mid = plan.batch_size if first and lo < plan.batch_size < top else (lo + top) // 2
            first = False
            lo, top = (mid, top) if attempt(mid) else (lo, mid)
    finally:
        for lim in limits:
            lim.close()
    return {
        "model": cfg.name, "n_layer": cfg.n_layer, "prompt_len": prompt_len, "gen_len": gen_len, "tp": tp,
        "limit_bytes": limit_bytes, "rank_limit_bytes": rank_limit, "limit_kind": limit.kind,
        "planner_batch": plan.batch_size,
        "probe_batch": lo, "search_top": hi, "tries": [{**asdict(t), "ratio": t.ratio} for t in tries],
    }
