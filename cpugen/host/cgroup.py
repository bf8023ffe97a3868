"""Memory cgroups: how much room this process's group still allows (the planner's budget), and hard
limits for a child process (the probe's tries): a cgroup of its own where the host allows, else
RLIMIT_DATA, else a watchdog on its resident memory."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_int(p: Path) -> int | None:
    try:
        text = p.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return None if v >= 2**62 else v  # v1 writes ~2^63 for "no limit"


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup still allows (limit - usage, the tightest level), or None.

    cgroup v2: <root>/<path>/memory.max and memory.current; v1: <root>/memory/<path>/
    memory.limit_in_bytes and memory.usage_in_bytes. Each level from the process's group up to the
    mount root is read (a container sees its own group as the root)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v1_path = v2_path = None
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and ctrls == "":
            v2_path = path
        elif "memory" in ctrls.split(","):
            v1_path = path
    rooms = []
    for base, path, limit_f, usage_f in ((root / "memory", v1_path, "memory.limit_in_bytes", "memory.usage_in_bytes"),
                                         (root, v2_path, "memory.max", "memory.current")):
        if not (base / limit_f).exists() and path is None:
            continue
        parts = [p for p in (path or "/").split("/") if p]
        for depth in range(len(parts), -1, -1):
            d = base.joinpath(*parts[:depth])
            limit, usage = _read_int(d / limit_f), _read_int(d / usage_f)
            if limit is not None and usage is not None:
                rooms.append(max(limit - usage, 0))
    return min(rooms) if rooms else None


# --- hard limits ---------------------------------------------------------------------------------------
class Limit:
    """A way to hold one child process under `limit` bytes."""

    kind = "none"

    def __init__(self, limit: int):
        self.limit = limit

    def preexec(self):  # runs in the child before exec
        pass

    def watch(self, proc: subprocess.Popen) -> str | None:
        """Waits for the child; returns why it was stopped, if the limit stopped it."""
        proc.wait()
        return None

    def close(self):
        pass


class CgroupLimit(Limit):
    kind = "cgroup"

    def __init__(self, limit: int, group: Path, limit_file: str):
        super().__init__(limit)
        self.group, self.limit_file = group, limit_file

    @classmethod
    def create(cls, limit: int) -> "CgroupLimit | None":
        name = f"cpugen-probe-{os.getpid()}-{time.monotonic_ns()}"
        for base, limit_file in ((CGROUP_ROOT / "memory", "memory.limit_in_bytes"), (CGROUP_ROOT, "memory.max")):
            if not (base / limit_file).exists() and not (base / "cgroup.controllers").exists():
                continue
            group = base / name
            try:
                group.mkdir()
                (group / limit_file).write_text(str(limit))
                swap = group / ("memory.memsw.limit_in_bytes" if limit_file == "memory.limit_in_bytes"
                                else "memory.swap.max")
                if swap.exists():
                    try:
                        swap.write_text(str(limit) if limit_file == "memory.limit_in_bytes" else "0")
                    except OSError:
                        pass
                return cls(limit, group, limit_file)
            except OSError:
                try:
                    group.rmdir()
                except OSError:
                    pass
        return None

    def preexec(self):
        (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def watch(self, proc):
        proc.wait()
        return "killed by the cgroup's OOM killer" if proc.returncode == -signal.SIGKILL else None

    def close(self):
        for _ in range(50):
            try:
                self.group.rmdir()
                return
            except OSError:
                time.sleep(0.1)


class RlimitData(Limit):
    kind = "rlimit_data"

    def preexec(self):
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (self.limit, self.limit))


class Watchdog(Limit):
    kind = "watchdog"

    def watch(self, proc):
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                if p.memory_info().rss > self.limit:
                    proc.kill()
                    proc.wait()
                    return f"resident memory passed {self.limit} bytes: stopped by the watchdog"
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        proc.wait()
        return None


def make_limit(limit: int, prefer: str = "auto") -> Limit:
    if prefer in ("auto", "cgroup"):
        c = CgroupLimit.create(limit)
        if c is not None:
            return c
        if prefer == "cgroup":
            raise RuntimeError("cannot create a memory cgroup here (needs a writable cgroup memory controller)")
    if prefer in ("auto", "rlimit"):
        return RlimitData(limit)
    return Watchdog(limit)
