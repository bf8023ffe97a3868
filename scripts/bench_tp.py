#!/usr/bin/env python3
"""Tensor parallel on this host, side by side: one process on every core against N ranks of a core
share each, in interleaved rounds (medians, with the spread), with what the collectives cost a
decode step; then one all-reduce's latency, gloo's against cpugen's shared memory, at the hidden
widths that matter.

    python scripts/bench_tp.py [--model gptj-1b] [--layers 4] [--prompt-len 64] [--gen-len 32]
                               [--batch-sizes 1,8] [--tp 2] [--rounds 3]

Each run is `python -m cpugen run ... --json`, a fresh process (ranks and all), so a round measures
exactly what a user runs. Never run two benchmarks at once on a small machine: they measure each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args, tp: int, batch: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "cpugen", "run", "--model", args.model, "--layers", str(args.layers),
               "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--batch-size", str(batch),
               "--tp", str(tp), "--json", str(out), "--quiet"] + (["--threads", str(threads)] if threads else [])
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"bench_tp: {' '.join(cmd[2:])} failed: {p.stderr.strip()[-500:]}")
        return json.loads(out.read_text())


def _allreduce_worker(rank: int, world: int, port: int, widths: list[int], n: int, q):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from cpugen.runtime.shm import ShmAllReduce

    box = [ShmAllReduce.create(world) if rank == 0 else None]
    dist.broadcast_object_list(box, 0)
    pids = [None] * world
    dist.all_gather_object(pids, os.getpid())
    shm = ShmAllReduce(rank, world, box[0], pids, 60.0)
    dist.barrier()
    if rank == 0:
        os.unlink(box[0])
    res = {}
    for name, fn in (("gloo", dist.all_reduce), ("shm", shm.all_reduce)):
        for h in widths:
            t = torch.ones(h, dtype=torch.bfloat16)
            for _ in range(20):
                fn(t)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn(t)
                times.append(time.perf_counter() - t0)
            res[(name, h)] = statistics.median(times)
    dist.barrier()
    shm.close()
    dist.destroy_process_group()
    if rank == 0:
        q.put(res)


def allreduce_latency(world: int, widths: list[int], n: int = 300) -> dict[tuple, float]:
    """Median seconds of one all-reduce of a bf16 vector of each width: gloo over loopback, and
    cpugen's shared-memory one (runtime/shm.py)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, world, port, widths, n, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=600)
    for p in procs:
        p.join()
    return res


def spread(xs):
    return f"{statistics.median(xs):.4g} ({min(xs):.4g}-{max(xs):.4g})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gptj-1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs = [(1, None, f"tp 1 x {cores} threads"), (args.tp, None, f"tp {args.tp} x {max(1, cores // args.tp)} "
                                                                      "threads")]
    rows: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):  # interleaved: every configuration once a round
        for b in batches:
            for tp, threads, name in configs:
                rows.setdefault((b, name), []).append(run(args, tp, b, threads))
        print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    print(f"{args.model}, {args.layers} layers, prompt {args.prompt_len}, {args.gen_len} new tokens, {cores} cores, "
          f"{args.rounds} interleaved rounds: median (min-max)\n")
    print("| batch | configuration | decode tok/s | prefill GFLOP/s | collectives a step | their time a step (ms) "
          "| share of the step | vs tp 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for b in batches:
        base = statistics.median(x["token_throughput"] for x in rows[(b, configs[0][2])])
        for tp, _, name in configs:
            xs = rows[(b, name)]
            tput = [x["token_throughput"] for x in xs]
            pf = [x["prompt_flops"] / 1e9 for x in xs]
            if tp > 1:
                calls = f"{xs[0]['tp_collectives_per_step']:.0f}"
                comm = spread([1e3 * x["tp_comm_s_per_step"] for x in xs])
                share = spread([100 * x["tp_comm_share"] for x in xs]) + "%"
            else:
                calls = comm = share = "-"
            print(f"| {b} | {name} | {spread(tput)} | {spread(pf)} | {calls} | {comm} | {share} | "
                  f"{statistics.median(tput) / base:.2f}x |")
    widths = [2048, 4096, 12288]
    lat = allreduce_latency(args.tp, widths)
    print(f"\none all-reduce of a bf16 vector, {args.tp} ranks on this host, a core each (median of 300):\n")
    print("| width | gloo (loopback) | cpugen's shared memory |\n|---|---|---|")
    for h in widths:
        print(f"| {h} ({2 * h / 1024:.0f} KiB) | {1e6 * lat[('gloo', h)]:.0f} us | {1e6 * lat[('shm', h)]:.1f} us |")


if __name__ == "__main__":
    main()
