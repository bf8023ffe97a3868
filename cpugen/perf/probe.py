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
a = json.loads(sys.argv[1])
rec = run(RunSpec(a["model"], a["batch"], a["prompt_len"], a["gen_len"], a["layers"], a["backend"], a["dtype"],
                  quiet=True, memory_budget=a["budget"], decode_steps=a["decode_steps"], check_fit=False,
                  threads=a["threads"]))
print(json.dumps({"peak": rec.peak_rss_bytes, "predicted": rec.extra["predicted_peak_bytes"]}))
"""


def run_try(args: dict, batch: int, limit: Limit, timeout: float = 1800) -> tuple[bool, int | None, str]:
    """(fits, measured peak, why) for one batch in a child process under `limit`."""
    payload = json.dumps({**args, "batch": batch})
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, payload], stdout=subprocess.PIPE, stderr=err,
                                text=True, preexec_fn=limit.preexec, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            why = limit.watch(proc)
        except BaseException:
            proc.kill()
            raise
        out = proc.stdout.read()
        err.seek(0)
        errtext = err.read()
    if proc.returncode == 0:
        res = json.loads(out.strip().splitlines()[-1])
        return True, res["peak"], ""
    if why:
        return False, None, why
    if proc.returncode == -signal.SIGKILL:
        return False, None, "killed (SIGKILL: out of memory)"
    lines = [x for x in errtext.strip().splitlines() if x.strip()]
    last = lines[-1] if lines else f"exit status {proc.returncode}"
    if "memory" in errtext.lower() or "alloc" in errtext.lower():
        return False, None, f"out of memory: {last[:160]}"
    raise RuntimeError(f"batch {batch} failed for a reason other than memory: {last[:300]}")


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
          max_batch: int | None = None, on_try=None) -> dict:
    """Binary search for the largest batch that runs under limit_bytes; returns a report dict."""
    import torch

    from cpugen.runtime import planner

    itemsize = torch.finfo(getattr(torch, dtype)).bits // 8
    budget = f"{limit_bytes}B"
    overhead, file_backed = child_baseline()  # the children's runtime, not this process's
    plan = planner.plan(cfg, prompt_len, gen_len, itemsize, backend, memory_budget=budget, overhead=overhead,
                        file_backed=file_backed)
    args = dict(model=model_spec, layers=cfg.n_layer, prompt_len=prompt_len, gen_len=gen_len, backend=backend,
                dtype=dtype, budget=budget, decode_steps=decode_steps, threads=threads)
    from cpugen.runtime import native

    native.build_all()  # build (or load) the native kernels here, not in a child under the limit
    limit = make_limit(limit_bytes, prefer)
    tries: list[Try] = []

    def attempt(b: int) -> bool:
        t0 = time.perf_counter()
        pred = planner.plan(cfg, prompt_len, gen_len, itemsize, backend, memory_budget=budget, batch_size=b,
                            overhead=plan.overhead_bytes, file_backed=plan.file_backed_bytes).predicted_peak_bytes
        fits, peak, why = run_try(args, b, limit)
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
        limit.close()
    return {
        "model": cfg.name, "n_layer": cfg.n_layer, "prompt_len": prompt_len, "gen_len": gen_len,
        "limit_bytes": limit_bytes, "limit_kind": limit.kind, "planner_batch": plan.batch_size,
        "probe_batch": lo, "search_top": hi, "tries": [{**asdict(t), "ratio": t.ratio} for t in tries],
    }
