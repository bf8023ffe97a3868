"""A shared-memory all-reduce for the ranks of one host: gloo's latency without gloo.

gloo over loopback takes about half a millisecond for a decode step's all-reduce of a few KiB
(scripts/bench_tp.py; a 4-layer gptj-1b step spends a fifth of its time there). Ranks on one host
can instead meet in one shared mapping: each writes its tensor into its own slot and raises its
`ready` counter, waits until every rank's counter reaches the same step, sums the slots in rank
order in fp32 (so every rank gets the same bytes, rounded once) and raises its `done` counter. Two
sets of slots alternate, and a rank writes a set only when every rank has read it two steps
before. The mapping is a file in /dev/shm unlinked as soon as every rank holds it, so no crash
leaves it behind. A wait that lasts longer than the group's timeout, or whose peer process is
gone, is an error, never a hang. Tensors larger than a slot (prefill's) go through gloo.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid

import numpy as np
import torch

from cpugen.errors import CpugenError

SLOT_BYTES = 1 << 20  # per rank and set: a decode step's all-reduce of 256 sequences at h = 2048
LINE = 8  # int64s per cache line: each rank's counter on a line of its own


class ShmAllReduce:
    def __init__(self, rank: int, world: int, path: str, pids: list[int], timeout_s: float):
        self.rank, self.world, self.pids, self.timeout_s = rank, world, pids, timeout_s
        head = 2 * world * LINE * 8
        self.size = head + 2 * world * SLOT_BYTES
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        counters = np.frombuffer(self.map, dtype=np.int64, count=2 * world * LINE)
        self.ready, self.done = counters[: world * LINE: LINE], counters[world * LINE:: LINE]
        self.slots = torch.frombuffer(self.map, dtype=torch.uint8, offset=head, count=2 * world * SLOT_BYTES) \
            .view(2, world, SLOT_BYTES)  # (set, rank, bytes)
        self.seq = 0

    @staticmethod
    def create(world: int) -> str:
        """The mapping's file, made by rank 0 (the others open it by name)."""
        path = f"/dev/shm/cpugen-tp-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, 2 * world * LINE * 8 + 2 * world * SLOT_BYTES)
        finally:
            os.close(fd)
        return path

    def fits(self, t: torch.Tensor) -> bool:
        return t.numel() * t.element_size() <= SLOT_BYTES and t.dtype in (torch.bfloat16, torch.float32)

    def _wait(self, counters: np.ndarray, seq: int, what: str):
        spins, t0 = 0, None
        while counters.min() < seq:
            spins += 1
            if spins % 4096 == 0:  # now and then: has a peer gone, or has it taken too long?
                t0 = t0 or time.monotonic()
                for r, pid in enumerate(self.pids):
                    if counters[r] < seq and not _alive(pid):
                        raise CpugenError(f"another rank stopped mid-run (rank {r}, pid {pid}, is gone)")
                if time.monotonic() - t0 > self.timeout_s:
                    late = [r for r in range(self.world) if counters[r] < seq]
                    raise CpugenError(f"rank(s) {', '.join(map(str, late))} did not {what} within "
                                      f"{self.timeout_s:g} s: they may have hung")
                time.sleep(0)  # let another thread of this core run

    def _exchange(self, t: torch.Tensor, combine):
        """Every rank's t, as (ranks, *t.shape) in the slots, handed to combine before the set is
        released; returns what combine returns."""
        self.seq += 1
        s = self.seq % 2
        n = t.numel() * t.element_size()
        self._wait(self.done, self.seq - 2, "finish a step")  # set s is free: every rank read it
        self.slots[s, self.rank, :n].copy_(t.reshape(-1).view(torch.uint8))
        self.ready[self.rank] = self.seq
        self._wait(self.ready, self.seq, "reach the same step")
        out = combine(self.slots[s, :, :n].view(t.dtype).view(self.world, *t.shape))
        self.done[self.rank] = self.seq
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks, in place: in rank order in fp32, rounded once, so the same
        bytes on every rank."""
        def total(parts):
            acc = parts[0].to(torch.float32, copy=True)  # never in place: parts are the shared slots
            for r in range(1, self.world):
                acc += parts[r]
            t.copy_(acc)
            return t

        return self._exchange(t.contiguous() if not t.is_contiguous() else t, total)

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's t joined along the last dimension, rank 0's first."""
        return self._exchange(t.contiguous(), lambda parts: torch.cat(list(parts), dim=-1))

    def close(self):
        try:
            del self.slots, self.ready, self.done
            self.map.close()
        except (BufferError, AttributeError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # a rank that exited but is not reaped yet (a zombie of its launcher) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
