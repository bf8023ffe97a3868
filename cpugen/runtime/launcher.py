"""Starting the ranks of a tensor-parallel run on this host: `cpugen run --tp N` without torchrun.

N copies of the same command, each with the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); runtime/distributed.py joins them. This
module imports no torch: the launcher holds no model memory while its ranks run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from cpugen.host.cpu import usable_cores


def in_rank() -> bool:
    """Started as one rank of several (by torchrun or by `launch`)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], tp: int, stop_after_s: float = 10.0) -> int:
    """Runs `python -m cpugen ARGV` as tp ranks on this host and waits for them. Rank 0 writes the
    results; the others' stdout is dropped (their errors still reach stderr). When a rank fails, the
    others are stopped (SIGTERM, then SIGKILL after `stop_after_s`) and its status is returned."""
    if tp > usable_cores():
        print(f"cpugen: warning: {tp} ranks on {usable_cores()} usable cores will share them", file=sys.stderr)
    port = _free_port()
    procs = []
    for r in range(tp):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(tp), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "cpugen", *argv], env=env,
                                      stdout=None if r == 0 else subprocess.DEVNULL))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # a rank killed by a signal is the cause: the others' errors (a peer gone) follow from it
                r = min(failed, key=lambda r: (codes[r] >= 0, r))
                _stop(procs, stop_after_s)
                c = codes[r]
                if c < 0:  # killed by a signal: it could not say why itself
                    print(f"cpugen: error: rank {r} was killed by {signal.Signals(-c).name}; the other ranks were "
                          "stopped", file=sys.stderr)
                    return 2
                return c
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        _stop(procs, stop_after_s)
        return 130


def _stop(procs, grace: float):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
