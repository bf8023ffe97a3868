"""Where the compute threads run and where memory lands.

- Affinity: the cores this process may use are what `sched_getaffinity` (taskset, a cgroup cpuset)
  allows; `--threads` more than that oversubscribes them (warned in runtime/session.py's set_threads). Each of
  ATen's worker threads is pinned to one allowed core, so a streaming thread keeps its core, its
  L2 and its prefetch state for the whole run.
- NUMA: on a host with several nodes the threads fill the node holding most of the allowed cores
  first, and memory is bound to the nodes the threads run on (interleaved when they span several),
  so weights are read from local memory. With one node there is nothing to place: a no-op, said so
  in the record.
Worker 0 is the main thread, so it too is pinned: a process started from it afterwards inherits
that one core (cpugen starts none after placing its threads). `CPUGEN_PIN=0` leaves threads
unpinned, for A/B measurements.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cpugen import knobs

NODE_ROOT = Path("/sys/devices/system/node")
MPOL_BIND, MPOL_INTERLEAVE = 2, 3
SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}


@lru_cache(maxsize=1)
def allowed_cores() -> frozenset[int]:
    """The cores this process may use, as it started: pinning narrows the main thread's own mask,
    which sched_getaffinity would report afterwards."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API
        return frozenset(range(os.cpu_count() or 1))


current: "Placement | None" = None  # what the last apply() did, for the record


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    out = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def numa_nodes(root: Path = NODE_ROOT) -> dict[int, list[int]]:
    """Each NUMA node's CPUs, from sysfs; one node holding every CPU where sysfs has none."""
    nodes = {}
    for d in sorted(root.glob("node[0-9]*")) if root.is_dir() else []:
        try:
            nodes[int(d.name[4:])] = parse_cpulist((d / "cpulist").read_text())
        except (OSError, ValueError):
            continue
    return nodes or {0: list(range(os.cpu_count() or 1))}


@dataclass
class Placement:
    threads: int
    cores: list[int]  # the core each worker is pinned to (worker t -> cores[t]); empty: not pinned
    nodes: list[int]  # NUMA nodes of those cores
    n_nodes: int  # on the host
    memory: str  # how memory is placed
    note: str = ""  # why something was not done

    def describe(self) -> str:
        pinned = (f"{self.threads} threads pinned to cores {_ranges(self.cores)}" if self.cores
                  else f"{self.threads} threads, not pinned")
        node = f"{self.n_nodes} NUMA node" + ("s" if self.n_nodes > 1 else "")
        return f"{pinned}; {node}, {self.memory}" + (f" ({self.note})" if self.note else "")


def _ranges(cpus: list[int]) -> str:
    out, run = [], []
    for c in cpus:
        if run and c == run[-1] + 1:
            run.append(c)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
            run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return ",".join(out)


def plan(threads: int, allowed: set[int], nodes: dict[int, list[int]]) -> Placement:
    """One allowed core per thread, filling the node with most allowed cores first; not pinned
    where threads exceed the allowed cores (they share them: the scheduler may move them)."""
    by_node = sorted(((n, [c for c in cpus if c in allowed]) for n, cpus in nodes.items()),
                     key=lambda nc: (-len(nc[1]), nc[0]))
    by_node = [(n, cs) for n, cs in by_node if cs]
    if threads > len(allowed):
        used = [n for n, _ in by_node]
        return Placement(threads, [], used, len(nodes), _memory(used, len(nodes)),
                         f"{threads} threads on {len(allowed)} usable cores")
    cores, used = [], []
    for n, cs in by_node:
        take = cs[: threads - len(cores)]
        if take:
            cores += take
            used.append(n)
        if len(cores) == threads:
            break
    return Placement(threads, cores, sorted(used), len(nodes), _memory(sorted(used), len(nodes)))


def _memory(used: list[int], n_nodes: int) -> str:
    if n_nodes <= 1:
        return "memory placement not needed"
    if len(used) == 1:
        return f"memory bound to node {used[0]}"
    return f"memory interleaved over nodes {_ranges(used)}"


def set_memory_policy(nodes: list[int]) -> None:
    """Binds this process's future allocations to `nodes` (interleaved over several); raises
    OSError where the kernel refuses."""
    nr = SYS_SET_MEMPOLICY.get(platform.machine())
    if nr is None:
        raise OSError(f"set_mempolicy: unknown syscall number on {platform.machine()}")
    mask = 0
    for n in nodes:
        mask |= 1 << n
    bits = ctypes.c_ulong(mask)
    mode = MPOL_BIND if len(nodes) == 1 else MPOL_INTERLEAVE
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, mode, ctypes.byref(bits), ctypes.c_ulong(8 * ctypes.sizeof(bits) + 1)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"set_mempolicy: {os.strerror(err)}")


def apply(threads: int, root: Path = NODE_ROOT, pin=None, allowed: list[int] | None = None) -> Placement:
    """Pins the workers and places memory per `plan`; what could not be done goes in the note.
    `pin()` gives (the function that pins ATen's worker t to cores[t], or None, and why not):
    runtime/native.py's pinner, a native module. `allowed`: a share of the usable cores (a
    tensor-parallel rank's), to which the whole process is then confined, pinned or not."""
    global current
    nodes = numa_nodes(root)
    if allowed is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, allowed)  # threads started from now on inherit it
        except OSError:
            pass
    p = plan(threads, set(allowed if allowed is not None else allowed_cores()), nodes)
    if p.cores and not knobs.current().pin:
        p.cores, p.note = [], "CPUGEN_PIN=0"
    if p.cores:
        fn, why = pin() if pin is not None else (None, "no pinning function given")
        if fn is None:
            p.cores, p.note = [], f"pinning unavailable: {why}"
        else:
            fn(p.cores)
    if p.n_nodes > 1:
        try:
            set_memory_policy(p.nodes)
        except OSError as e:
            p.memory, p.note = "memory placement refused", str(e)
    current = p
    return p
