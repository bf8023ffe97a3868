"""One path from a request to a ready model: `run`, `bench`, `generate`, the probe's child and the
peer benchmark's worker all get their model here, so a check or a step added here holds for all.

    s = open_session("gptj-1b", layers=4, backend="auto", threads=None)  # resolve, threads
    p = s.plan(prompt_len, gen_len, batch)   # what it needs, checked against the budget, nothing allocated
    s.load()                                 # kernels built if needed, threads pinned, weights, backend
    s.ready_for(p.batch_size)                # per-batch preparation (oneDNN reorder above the gemv's rows)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cpugen import knobs
from cpugen.errors import CpugenError
from cpugen.host import placement
from cpugen.host.cpu import cap_libraries, cpu_info, usable_cores
from cpugen.model.config import ModelConfig
from cpugen.model.source import resolve
from cpugen.model.transformer import Transformer
from cpugen.model.weights import load_model
from cpugen.progress import progress
from cpugen.host.environment import git_commit
from cpugen.model import shard
from cpugen.model.shard import Shard
from cpugen.runtime import backends, distributed, eager, native, planner

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def log(quiet: bool):
    """A function printing `cpugen: ...` lines on stderr, or doing nothing when quiet."""
    return (lambda *a: None) if quiet else (lambda *a: print("cpugen:", *a, file=sys.stderr))


def check_lengths(cfg: ModelConfig, prompt_len: int, new_tokens: int, prompt: str = "--prompt-len",
                  new: str = "--gen-len"):
    """The one check that a prompt and its new tokens fit the model's positions."""
    if prompt_len < 1:
        raise CpugenError(f"{prompt} must be at least 1, not {prompt_len}")
    if new_tokens < 1:
        raise CpugenError(f"{new} must be at least 1, not {new_tokens}")
    total = prompt_len + new_tokens
    if total > cfg.max_positions:
        raise CpugenError(f"prompt {prompt_len} + {new_tokens} new tokens = {total} exceeds {cfg.name}'s "
                          f"{cfg.max_positions} positions: shorten the prompt or lower {new}")


def set_threads(n: int | None) -> int:
    """n intra-op threads (default: the usable cores)."""
    cores = usable_cores()
    n = n or cores
    if n < 1:
        raise CpugenError(f"--threads must be at least 1, not {n}")
    if n > cores:
        print(f"cpugen: warning: {n} threads on {cores} usable cores will oversubscribe them", file=sys.stderr)
    torch.set_num_threads(n)
    return n


def place(threads: int, group: distributed.Group | None = None) -> placement.Placement:
    """Each compute thread pinned to its own core, memory by NUMA node (host/placement.py); a
    tensor-parallel rank's on its own share of the host's cores (its NUMA node where it has one)."""
    cores = None if group is None else distributed.rank_cores(group.local_rank, group.local_world)
    return placement.apply(threads, pin=native.pinner, allowed=cores)


@dataclass
class Session:
    cfg: ModelConfig
    checkpoint: Path | None
    backend: str  # resolved: eager | ipex
    dtype_name: str
    threads: int
    seed: int = 0
    quiet: bool = False
    model: Transformer | None = None
    forward: object = None  # what the backend gives to call
    load_s: float = 0.0  # weights built or read
    prepare_s: float = 0.0  # the backend's one-time work: native kernels loaded (or built), IPEX packing
    group: distributed.Group | None = None  # tensor parallel: this rank's place and collectives
    room_bytes: int | None = None  # the plan's budget less the runtime's overhead (None before a plan)
    layout_choice: dict | None = None  # the AVX2 level's layout choice (runtime/layout.py), for the record

    @property
    def shard(self) -> Shard:
        return self.group.shard if self.group else Shard()

    @property
    def tp(self) -> int:
        return self.shard.world

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def plan(self, prompt_len: int, gen_len: int, batch: int | str = "auto", memory_budget: str | None = None,
             host_memory: str | None = None, max_batch_size: int | None = None, check_fit: bool = True,
             what: str | None = None, hint: str | None = None, **measured) -> planner.Plan:
        """The plan for `batch` ("auto": the largest that fits), checked before anything large is
        allocated: a batch that does not fit (or kernels that would have to be compiled past the
        budget) is an error saying what to change. `what` names the batch in that error and `hint`
        says what to change (default: the largest batch that fits)."""
        auto = batch == "auto"
        if not auto and batch < 1:
            raise CpugenError(f"--batch-size must be at least 1, not {batch}")
        check_lengths(self.cfg, prompt_len, gen_len)
        split = dict(tp=self.tp, ranks_per_host=self.group.sharing if self.group and host_memory is None else 1)
        p = planner.plan(self.cfg, prompt_len, gen_len, self.itemsize, self.backend, memory_budget, host_memory,
                         max_batch_size if auto else None, None if auto else batch, **measured, **split)
        if auto and p.batch_size == 0:
            raise CpugenError(planner.explain_no_fit(p, self.cfg, self.itemsize))
        if not auto and check_fit and planner.needed(p) > p.budget_bytes:
            if hint is None:
                best = planner.plan(self.cfg, prompt_len, gen_len, self.itemsize, self.backend, memory_budget,
                                    host_memory, overhead=p.overhead_bytes, file_backed=p.file_backed_bytes, **split)
                if best.batch_size == 0:
                    raise CpugenError(planner.explain_no_fit(best, self.cfg, self.itemsize))
                hint = f"use --batch-size {best.batch_size} or less (or --batch-size auto)"
            raise CpugenError(planner.shortfall(p, what or f"batch {batch}", hint))
        if host_memory is None:
            self.check_build_room(p)
        p = distributed.same(self.group, p)  # every rank runs rank 0's plan
        self.room_bytes = p.budget_bytes - p.overhead_bytes  # what one-time work before the model may take
        return p

    def check_build_room(self, p: planner.Plan):
        """Compiling the kernels (once per machine) peaks at about 1.6 GiB in the compiler, before
        the model loads: a budget that cannot hold that beside the runtime is refused."""
        missing = native.missing_builds() if self.backend == "eager" else []
        if not missing:
            return
        need = p.overhead_bytes + native.BUILD_PEAK_BYTES
        if need > p.budget_bytes:
            raise CpugenError(f"the native kernels ({', '.join(missing)}) are not built on this machine, and compiling "
                              f"them needs about {planner.fmt(need)} before the model loads, more than the budget "
                              f"of {planner.fmt(p.budget_bytes)} ({p.budget_source}): run `python -m cpugen build` "
                              f"first (or set {' and '.join(sorted({native.switch_off(n) for n in missing}))})")
        log(self.quiet)(f"building the native kernels first ({', '.join(missing)}: once per machine, about "
                        f"{planner.fmt(native.BUILD_PEAK_BYTES)} in the compiler, before the model loads)")

    def load(self) -> "Session":
        """Builds (or loads) the kernels, pins the threads, then the weights (random or a
        checkpoint) in the session's dtype, prepared for the backend."""
        t0 = time.perf_counter()
        if self.backend == "eager" and self.dtype == torch.bfloat16:
            for name in native.missing_builds():  # compiled before the threads are pinned: the compiler gets every core
                native.extension(name)
        place(self.threads, self.group)
        tl = time.perf_counter()
        if self.backend == "eager" and self.dtype == torch.bfloat16:  # it times its own weights: before the model's
            self.layout_choice = eager.choose_layout(self.group, log(self.quiet), self.room_bytes)
        t1 = time.perf_counter()
        t0 += t1 - tl  # the layout's timing is a cost once per host (its record says it), not the backend's per run
        self.model = load_model(self.cfg, self.checkpoint, self.dtype, self.seed,
                                progress("weights" if self.checkpoint is None else "loading", self.quiet), self.shard)
        t2 = time.perf_counter()
        if self.group is not None:  # before the backend: a split model's blocks are not the decode stack's
            distributed.install(self.model, self.group)
        self.forward = backends.apply(self.model, self.backend, self.dtype)
        self.load_s, self.prepare_s = t2 - t1, (t1 - t0) + time.perf_counter() - t2
        return self

    def ready_for(self, batch: int):
        eager.for_batch(self.model, self.backend, self.dtype, batch)


def open_session(model: str | None = None, *, cfg: ModelConfig | None = None, checkpoint: Path | None = None,
                 layers: int | None = None, backend: str = "auto", dtype: str = "bfloat16",
                 threads: int | None = None, seed: int = 0, quiet: bool = False) -> Session:
    """A session for `--model` as given (or an already resolved config and checkpoint): the model's
    config, the backend that will run it, the threads. Nothing large is allocated."""
    if cfg is None:
        cfg, checkpoint = resolve(model, layers)
    else:
        cfg = cfg.with_layers(layers)
    if dtype not in DTYPES:
        raise CpugenError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    k = knobs.current()  # a bad CPUGEN_* value is an error before any work
    cpu_info()  # so is a CPUGEN_ISA above this CPU's level
    cap_libraries()  # and a capped level holds for torch's and oneDNN's kernels too
    group = distributed.current
    if group is not None:  # every rank the same model, options and cpugen, or none starts
        shard.check(cfg, group.world)
        distributed.agree(group, {"model": cfg.name, "layers": cfg.n_layer, "config": distributed.digest(
            cfg.__dict__), "checkpoint": str(checkpoint), "backend": backend, "dtype": dtype, "seed": seed,
            "commit": git_commit(), "knobs": k.key(), "argv": distributed.what_runs(sys.argv[1:])})
        if threads is None:
            threads = len(distributed.rank_cores(group.local_rank, group.local_world))
    backend = backends.resolve(backend, dtype)
    return Session(cfg, checkpoint, backend, dtype, set_threads(threads), seed, quiet, group=group)
