"""Tensor parallelism over torch.distributed: the process group, the two collectives a split model
calls, the ranks' agreement check, and cpugen's own launcher for the ranks of one host.

A rank learns its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); `cpugen run --tp N` without torchrun starts N copies of
itself on this host with that environment (runtime/launcher.py). The backend is gloo, which every CPU wheel of
PyTorch has. Every collective runs under the group's timeout, and a rank that fails ends with a
one-line error naming itself; a rank that dies closes its connections, which ends the others'
collectives with an error instead of a hang; the launcher stops every rank when one fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from cpugen import knobs
from cpugen.errors import CpugenError
from cpugen.host.placement import allowed_cores, numa_nodes
from cpugen.model.shard import Shard
from cpugen.runtime.shm import ShmAllReduce

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 120.0  # a rendezvous or a collective that waits longer than this is an error


current: "Group | None" = None  # this process's group, once init() has joined it


def env_rank() -> tuple[int, int, int, int]:
    """(rank, world, local rank, local world) from the environment."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        raise CpugenError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (torchrun sets them)") \
            from None
    return rank, world, local, local_world


@dataclass
class Group:
    """This rank's place and its collectives, timed: the record's communication figures."""
    shard: Shard
    local_rank: int
    local_world: int
    hosts: list[str] = field(default_factory=list)  # each rank's host name
    sharing: int = 1  # ranks (this one included) sharing this rank's memory: same host, same memory cgroup
    shm: ShmAllReduce | None = None  # every rank on this host: small collectives through shared memory
    comm_s: float = 0.0  # seconds in collectives since reset()
    comm_bytes: int = 0  # bytes each rank contributed to them
    comm_calls: int = 0

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def world(self) -> int:
        return self.shard.world

    def reset(self):
        self.comm_s, self.comm_bytes, self.comm_calls = 0.0, 0, 0

    def _timed(self, fn, nbytes: int):
        t0 = time.perf_counter()
        try:
            fn()
        except CpugenError:  # the shared-memory path's own, already in words
            raise
        except Exception as e:  # noqa: BLE001 - gloo's errors are RuntimeError subclasses of several kinds
            raise CpugenError(peer_failure(e)) from None
        self.comm_s += time.perf_counter() - t0
        self.comm_bytes += nbytes
        self.comm_calls += 1

    @property
    def comm(self) -> str:
        """What carries the collectives: "shm+gloo" (shared memory, gloo for what exceeds a slot) or "gloo"."""
        return "shm+gloo" if self.shm else "gloo"

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums t over the ranks, in place (the row-parallel matmuls' partial outputs)."""
        t = t.contiguous()
        if self.shm is not None and self.shm.fits(t):
            self._timed(lambda: self.shm.all_reduce(t), t.numel() * t.element_size())
        else:
            self._timed(lambda: dist.all_reduce(t), t.numel() * t.element_size())
        return t

    def gather_logits(self, logits: torch.Tensor, vocab: int) -> torch.Tensor:
        """(..., this rank's vocabulary rows) -> (..., vocab), the same bytes on every rank, so that
        every rank takes the same next tokens."""
        per = -(-vocab // self.world)
        if logits.shape[-1] < per:  # the last rank's share is short: pad it to the others'
            pad = torch.full((*logits.shape[:-1], per - logits.shape[-1]), float("-inf"), dtype=logits.dtype)
            logits = torch.cat((logits, pad), dim=-1)
        logits = logits.contiguous()
        nbytes = logits.numel() * logits.element_size()
        if self.shm is not None and self.shm.fits(logits):
            box = []
            self._timed(lambda: box.append(self.shm.all_gather_last(logits)), nbytes)
            return box[0][..., :vocab]
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        self._timed(lambda: dist.all_gather(parts, logits), nbytes)
        return torch.cat(parts, dim=-1)[..., :vocab]

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's t on every rank (a sampled token: one draw, everywhere)."""
        t = t.contiguous()
        self._timed(lambda: dist.broadcast(t, 0), t.numel() * t.element_size())
        return t


def peer_failure(e: Exception) -> str:
    """A collective that failed: a peer stopped (its connection closed) or did not answer in time."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "timed out" in msg.lower() or "timeout" in msg.lower():
        return f"another rank did not answer within the timeout ({msg[:200]}): it may have stopped or hung"
    return f"another rank stopped mid-run ({msg[:200]})"


def init(tp: int, timeout_s: float = TIMEOUT_S) -> Group:
    """Joins the process group this rank's environment describes; `tp` must match it."""
    rank, world, local, local_world = env_rank()
    if world != tp:
        raise CpugenError(f"this rank was started as one of {world} (WORLD_SIZE) but --tp is {tp}: give --tp {world}")
    if not 0 <= rank < world:
        raise CpugenError(f"RANK {rank} is outside 0..{world - 1}")
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001 - the store's and gloo's errors are of several kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CpugenError(f"the rendezvous at {where} did not complete within {timeout_s:g} s ({msg[:200]}): "
                          "check that every rank was started, with the same --rdzv-endpoint / MASTER_ADDR and "
                          "MASTER_PORT, and that the port is reachable") from None
    g = Group(Shard(rank, world), local, local_world)
    places: list = [None] * world
    try:
        dist.all_gather_object(places, (socket.gethostname(), _memory_cgroup()))
    except Exception as e:  # noqa: BLE001
        raise CpugenError(peer_failure(e)) from None
    g.hosts = [h for h, _ in places]
    g.sharing = sum(p == places[rank] for p in places)
    if len(set(g.hosts)) == 1 and knobs.current().tp_comm == "auto":
        g.shm = _join_shm(g, timeout_s)
    global current
    current = g
    return g


def _join_shm(g: Group, timeout_s: float) -> ShmAllReduce:
    """Rank 0 makes the mapping; every rank opens it; rank 0 removes its name once all hold it."""
    try:
        path = ShmAllReduce.create(g.world) if g.rank == 0 else None
    except OSError as e:
        raise CpugenError(f"cannot make the ranks' shared memory in /dev/shm ({e.strerror}): "
                          "set CPUGEN_TP_COMM=gloo") from None
    info = gather_object(g, (path, os.getpid()))
    shm = ShmAllReduce(g.rank, g.world, info[0][0], [pid for _, pid in info], timeout_s)
    try:
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        raise CpugenError(peer_failure(e)) from None
    if g.rank == 0:
        os.unlink(path)
    return shm


def gather_object(g: Group, obj) -> list:
    """Every rank's obj, on every rank."""
    out: list = [None] * g.world
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:  # noqa: BLE001
        raise CpugenError(peer_failure(e)) from None
    return out


def same(g: Group | None, obj):
    """Rank 0's obj on every rank: decisions one rank makes from its own measurements (a plan
    against its memory) taken by all, so that no rank takes another path."""
    if g is None:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, 0)
    except Exception as e:  # noqa: BLE001
        raise CpugenError(peer_failure(e)) from None
    return box[0]


def _memory_cgroup() -> str:
    """This process's memory cgroup (ranks in one share its limit; each in its own has its own)."""
    try:
        for line in open("/proc/self/cgroup"):
            _, ctrl, path = line.strip().split(":", 2)
            if "memory" in ctrl.split(",") or ctrl == "":
                return path
    except OSError:
        pass
    return ""


OUTPUT_OPTIONS = ("--json", "--out", "--tp-timeout")  # where a rank writes, how long it waits: may differ


def what_runs(argv: list[str]) -> list[str]:
    """The command line without the options that do not change what runs (outputs, --quiet)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in OUTPUT_OPTIONS:
            skip = True
            continue
        if a == "--quiet" or any(a.startswith(o + "=") for o in OUTPUT_OPTIONS):
            continue
        out.append(a)
    return out


def digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agree(g: Group, what: dict):
    """Every rank must run the same model with the same options and the same cpugen: rank 0's
    digest of `what` is compared on every rank, and a rank that differs stops them all."""
    mine = digest(what)
    all_: list = [None] * g.world
    try:
        dist.all_gather_object(all_, (mine, what))
    except Exception as e:  # noqa: BLE001
        raise CpugenError(peer_failure(e)) from None
    ref_digest, ref = all_[0]
    for r, (d, w) in enumerate(all_):
        if d != ref_digest:
            diff = sorted(k for k in set(ref) | set(w) if ref.get(k) != w.get(k))
            raise CpugenError(f"rank {r} was started differently from rank 0 ({', '.join(diff)}: "
                              f"{', '.join(f'{k}={w.get(k)!r} against {ref.get(k)!r}' for k in diff[:3])}): "
                              "start every rank with the same model, options and cpugen commit")


def install(model, g: Group):
    """Wires the split model's collectives: one all-reduce per row-parallel output (GPT-J's
    attention and MLP share one), the lm_head's vocabulary rows gathered into whole logits."""
    vocab = model.cfg.vocab_size
    for b in model.blocks:
        b.reduce = g.all_reduce
    model.gather = lambda logits: g.gather_logits(logits, vocab)
    model.same_tokens = g.broadcast


def finish(ok: bool = True):
    """Leaves the group: after every rank is done (a barrier), so that no rank tears its connections
    down while another still uses them; a rank that failed leaves at once (its peers see it go)."""
    if dist.is_available() and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer may be gone already
            pass


def exit_rank(code: int):
    """Ends a rank's process once its work is done and the group is left: stdout and stderr flushed,
    then out without the interpreter's teardown. Torn down at exit, gloo's threads abort the process
    now and then after all its work ("terminate called without an active exception", no Python
    frame: 2 of 25 gloo-only `--tp 2` runs on this host), which would turn a finished run into a
    failed one."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def rank_cores(local_rank: int, local_world: int) -> list[int]:
    """The cores of this rank's share of the host: one NUMA node each where the host has at least
    as many nodes with usable cores as ranks, else an even split of the usable cores in order."""
    allowed = sorted(allowed_cores())
    nodes = [sorted(set(cs) & set(allowed)) for _, cs in sorted(numa_nodes().items())]
    nodes = [cs for cs in nodes if cs]
    if len(nodes) >= local_world:
        return nodes[local_rank]
    per = max(1, len(allowed) // local_world)
    return allowed[local_rank * per:(local_rank + 1) * per] or allowed[-1:]
