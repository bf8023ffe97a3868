"""Who else had the CPUs while a row ran, as the operating system counts it.

On a shared host a timed row can be slowed by something cpugen cannot see in its own figures: the
hypervisor running another guest on this guest's vCPUs ("steal" in /proc/stat), or another process
on this machine. `Watch` reads the kernel's tick counters of the CPUs this process may run on
before and after a row, and this process's own CPU time (every thread's) over the same span:

    steal_share  steal ticks / all ticks of those CPUs
    other_share  busy ticks (user, nice, system, irq, softirq) that were not this process's / all ticks

`span_s` is the wall time the two readings cover. Linux only; elsewhere (or where /proc cannot be
read), and over spans under MIN_SPAN_S (a tick is 10 ms), both shares are None and nothing depends
on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's unit, per second


@dataclass(frozen=True)
class Ticks:
    cpus: int  # how many CPUs' counters are summed
    busy: int  # user + nice + system + irq + softirq (guest time is inside user)
    steal: int
    total: int  # every state, idle and iowait included
    own_s: float  # this process's user + system seconds, all threads


def read() -> Ticks | None:
    try:
        mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu")]
    except (OSError, AttributeError):
        return None
    busy = steal = total = cpus = 0
    for row in rows:
        if row[0] not in mine:
            continue
        cpus += 1
        v = [int(x) for x in row[1:9]] + [0] * (8 - len(row[1:9]))
        user, nice, system, idle, iowait, irq, softirq, st = v
        busy += user + nice + system + irq + softirq
        steal += st
        total += sum(v)
    if total == 0:
        return None
    t = os.times()
    return Ticks(cpus, busy, steal, total, t.user + t.system)


# shorter spans are too few ticks: at this floor one stray tick of one CPU is 2% of the span (1% on
# two CPUs), well under the 5% beyond its history's (perf/history.py HOST_BUSY) that excuses a row
MIN_SPAN_S = 0.5


def shares(a: Ticks | None, b: Ticks | None) -> dict:
    """{"host_steal_share", "host_other_cpu_share", "host_share_span_s"} between two readings; the
    shares None where unknown or where the span was under MIN_SPAN_S (too few ticks to tell)."""
    span = (b.total - a.total) / TICK / b.cpus if a is not None and b is not None and a.cpus == b.cpus else None
    if span is None or span < MIN_SPAN_S:
        return {"host_steal_share": None, "host_other_cpu_share": None, "host_share_span_s": span}
    total = b.total - a.total
    own = (b.own_s - a.own_s) * TICK
    other = max(0.0, (b.busy - a.busy) - own) / total
    return {"host_steal_share": (b.steal - a.steal) / total, "host_other_cpu_share": other,
            "host_share_span_s": span}


class Watch:
    """`with Watch() as w: ...`, then `w.result`: the two shares over the block."""

    def __enter__(self):
        self.result = shares(None, None)
        self._a = read()
        return self

    def __exit__(self, *exc):
        self.result = shares(self._a, read())
        return False
