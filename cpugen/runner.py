"""`cpugen run`: the reference's throughput experiment on one model, batch and setting.

Synthetic random prompt tokens (like the reference), a short warm-up over the same cache, then the
prompt pass timed as a whole and every decode step timed on its own.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from cpugen import backends, flops, native
from cpugen.config import ModelConfig
from cpugen.env import environment
from cpugen.errors import CpugenError
from cpugen.generate import Engine, Prompts, compute_context
from cpugen.kv_cache import kv_cache_bytes
from cpugen.memory import huge_page_bytes, peak_rss_bytes
from cpugen.progress import progress
from cpugen.record import GiB, RunRecord, count
from cpugen.weights import load_model, weight_bytes

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RunSpec:
    cfg: ModelConfig
    checkpoint: Path | None
    batch_size: int | str  # or "auto": the planner's largest batch
    prompt_len: int
    gen_len: int
    backend: str = "auto"
    dtype: str = "bfloat16"
    seed: int = 0
    threads: int | None = None
    quiet: bool = False
    warmup: bool = True
    roofline: bool = True  # compare with this machine's measured limits (cached per machine)
    memory_budget: str | None = None
    host_memory: str | None = None
    max_batch_size: int | None = None
    decode_steps: int | None = None  # run only this many of the gen_len - 1 decode steps (the cache
    #                                  is still sized for prompt + gen_len): the batch probe's workload
    check_fit: bool = True  # refuse a batch the planner says will not fit

    def validate(self):
        if self.batch_size != "auto" and self.batch_size < 1:
            raise CpugenError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.prompt_len < 1:
            raise CpugenError(f"--prompt-len must be at least 1, not {self.prompt_len}")
        if self.gen_len < 1:
            raise CpugenError(f"--gen-len must be at least 1, not {self.gen_len}")
        total = self.prompt_len + self.gen_len
        if total > self.cfg.max_positions:
            raise CpugenError(f"prompt {self.prompt_len} + generation {self.gen_len} = {total} tokens exceeds "
                              f"{self.cfg.name}'s {self.cfg.max_positions} positions: shorten either")


def plan_batch(spec: RunSpec, itemsize: int, backend: str):
    """The plan for this run, checked before anything large is allocated: the largest batch for
    `--batch-size auto`, else the given batch, which must fit."""
    from cpugen import planner

    auto = spec.batch_size == "auto"
    p = planner.plan(spec.cfg, spec.prompt_len, spec.gen_len, itemsize, backend, spec.memory_budget,
                     spec.host_memory, spec.max_batch_size, None if auto else spec.batch_size)
    if auto and p.batch_size == 0:
        raise CpugenError(planner.explain_no_fit(p, spec.cfg, itemsize))
    if not auto and spec.check_fit and planner.needed(p) > p.budget_bytes:
        best = planner.plan(spec.cfg, spec.prompt_len, spec.gen_len, itemsize, backend, spec.memory_budget,
                            spec.host_memory, overhead=p.overhead_bytes, file_backed=p.file_backed_bytes)
        if best.batch_size == 0:
            raise CpugenError(planner.explain_no_fit(best, spec.cfg, itemsize))
        raise CpugenError(f"batch {spec.batch_size} needs {planner.fmt(planner.needed(p))} "
                          f"with headroom but the budget is {planner.fmt(p.budget_bytes)} ({p.budget_source}): "
                          f"use --batch-size {best.batch_size} or less (or --batch-size auto)")
    return p


def decode_roofline_s(cfg: ModelConfig, roof, batch: int, prompt_len: int, gen_len: int, itemsize: int) -> float:
    """Mean over the run's decode steps of the roofline time: the weights streamed once per step
    plus the KV cache read at that step's context, against bandwidth; the step's FLOPs against peak."""
    weights = flops.streamed_params(cfg) * itemsize
    times = []
    for c in range(prompt_len + 1, prompt_len + gen_len):  # keys attended by each decode step
        kv_read = kv_cache_bytes(cfg, batch, c, itemsize)
        times.append(roof.step_time(weights + kv_read, batch * flops.token_flops(cfg, c)))
    return statistics.fmean(times)


def _roofline(cfg, B, P, G, itemsize, threads, step, prompt_flops) -> dict:
    from cpugen import roofline

    roof = roofline.get(threads)
    ideal = decode_roofline_s(cfg, roof, B, P, G, itemsize)
    return dict(roofline_read_gbps=roof.read_gbps, roofline_bf16_tflops=roof.bf16_tflops, decode_roofline_s=ideal,
                decode_efficiency=ideal / step, prefill_efficiency=prompt_flops / (roof.bf16_tflops * 1e12))


STALE_LIMITS = 1.05  # a run this far above the cached roofline says the limits are out of date


def stale_limits_note(rec: RunRecord) -> str | None:
    """A line for stderr when a run beat the cached limits: the machine is in a faster regime than
    when `cpugen roofline` measured it (shared hosts swing), so its efficiencies overstate."""
    over = [f"{name} {100 * eff:.0f}%" for name, eff in (("decode", rec.decode_efficiency),
                                                        ("prefill", rec.prefill_efficiency))
            if eff is not None and eff > STALE_LIMITS]
    if not over:
        return None
    return (f"cpugen: note: this run beat the cached limits ({', '.join(over)} of them; "
            f"{rec.roofline_read_gbps:.1f} GB/s, {rec.roofline_bf16_tflops:.3f} TFLOP/s): the machine is faster "
            f"now than when they were measured; refresh them with `python -m cpugen roofline --refresh`")


def set_threads(n: int | None) -> int:
    """n intra-op threads (default: the usable cores), each pinned to its own core (cpugen/placement.py)."""
    from cpugen import placement
    from cpugen.env import usable_cores

    cores = usable_cores()
    n = n or cores
    if n < 1:
        raise CpugenError(f"--threads must be at least 1, not {n}")
    if n > cores:
        print(f"cpugen: warning: {n} threads on {cores} usable cores will oversubscribe them", file=sys.stderr)
    torch.set_num_threads(n)
    placement.apply(n)
    return n


@dataclass
class Loaded:
    """A model ready to measure: loaded once, then run at any number of batch sizes and settings."""
    cfg: ModelConfig
    model: torch.nn.Module
    forward: object  # what the backend gives to call
    backend: str  # resolved: eager | ipex
    dtype: torch.dtype
    threads: int
    load_s: float = 0.0  # weights built or read
    prepare_s: float = 0.0  # the backend's one-time work: native kernels loaded (built once per machine), IPEX packing
    warmup_s: float = 0.0  # the last measure()'s packing for its batch and warm-up passes

    @property
    def itemsize(self) -> int:
        return torch.finfo(self.dtype).bits // 8


@dataclass
class Timing:
    """One repeat of the measured work: the prompt pass, then every decode step on its own."""
    prompt_time_s: float
    steps: list[float]


def load(spec: RunSpec, backend: str, threads: int) -> Loaded:
    """Weights (random or a checkpoint) in the run's dtype, prepared for the backend."""
    dtype = DTYPES[spec.dtype]
    t0 = time.perf_counter()
    model = load_model(spec.cfg, spec.checkpoint, dtype, spec.seed,
                       progress("weights" if spec.checkpoint is None else "loading", spec.quiet))
    t1 = time.perf_counter()
    forward = backends.apply(model, backend, dtype)
    return Loaded(spec.cfg, model, forward, backend, dtype, threads, t1 - t0, time.perf_counter() - t1)


def measure(spec: RunSpec, m: Loaded, p, repeats: int = 1, warmup: int = 1) -> list[Timing]:
    """`warmup` short warm-up passes, then `repeats` timed prompt passes and decode runs of batch
    p.batch_size at the spec's setting, all over one KV cache allocated once (and freed at the end)."""
    cfg, B, P, G = m.cfg, p.batch_size, spec.prompt_len, spec.gen_len
    t_warm = time.perf_counter()
    backends.for_batch(m.model, m.backend, m.dtype, B)
    engine = Engine(m.model, B, P + G, m.dtype, m.forward, p.prefill_chunk, p.prefill_micro_batch)
    gen = torch.Generator().manual_seed(spec.seed)
    prompts = Prompts(torch.randint(cfg.vocab_size, (B, P), generator=gen), torch.ones(B, P, dtype=torch.bool))
    n_steps = G - 1 if spec.decode_steps is None else min(spec.decode_steps, G - 1)
    timings = []
    try:
        with compute_context(m.dtype):
            for _ in range(warmup):  # first calls pay for allocator growth, kernel selection and prepacking
                w = min(P, 16)
                logits = engine.prefill(Prompts(prompts.tokens[:, :w], prompts.valid[:, :w]))
                for _ in range(min(2, G - 1)):
                    logits = engine.decode_one_token(native.argmax(logits))
                engine.reset()
            m.warmup_s = time.perf_counter() - t_warm
            bar = progress("prefill+decode", spec.quiet)
            for r in range(repeats):
                if r:
                    engine.reset()
                t0 = time.perf_counter()
                logits = engine.prefill(prompts)
                tok = native.argmax(logits)
                prompt_time = time.perf_counter() - t0
                steps = []
                for i in range(n_steps):
                    t0 = time.perf_counter()
                    logits = engine.decode_one_token(tok)
                    tok = native.argmax(logits)
                    steps.append(time.perf_counter() - t0)
                    if bar:
                        bar.update(r * n_steps + i + 1, repeats * n_steps, "decode steps")
                if not torch.isfinite(logits.float()).all():
                    raise CpugenError("the model produced non-finite logits: the weights or the dtype are unusable")
                timings.append(Timing(prompt_time, steps))
    finally:
        m.model.free_caches()
    return timings


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(spec: RunSpec, m: Loaded, p, timings: list[Timing]) -> RunRecord:
    """The record of one batch size: with several repeats, each figure is the median over repeats
    (min and max beside it); decode step statistics pool every step of every repeat."""
    cfg, B, P, G = m.cfg, p.batch_size, spec.prompt_len, spec.gen_len
    prompt_times = [t.prompt_time_s for t in timings]
    step_means = [statistics.fmean(t.steps) for t in timings if t.steps]
    all_steps = [s for t in timings for s in t.steps]
    prompt_time = statistics.median(prompt_times)
    step = statistics.median(step_means) if step_means else float("nan")
    nan = float("nan")
    p_flop = flops.prompt_flops(cfg, P)
    t_flop = flops.mean_token_flops(cfg, P, G)
    throughput = B / step if step_means else nan
    env = environment(m.threads)
    roof = (_roofline(cfg, B, P, G, m.itemsize, m.threads, step, B * p_flop / prompt_time)
            if spec.roofline and step_means else {})
    return RunRecord(
        model=cfg.name, backend=m.backend, dtype=spec.dtype, batch_size=B, prompt_len=P, gen_len=G,
        n_layer=cfg.n_layer, n_params=flops.n_params(cfg), weight_bytes=weight_bytes(m.model),
        kv_cache_bytes=p.kv_cache_bytes, prompt_time_s=prompt_time, prompt_flops=B * p_flop / prompt_time,
        prompt_flop_per_seq=p_flop, decode_time_per_token_s=step,
        decode_time_median_s=statistics.median(all_steps) if all_steps else nan,
        decode_time_min_s=min(all_steps, default=nan), decode_time_max_s=max(all_steps, default=nan),
        decode_steps=len(timings[0].steps), token_throughput=throughput, token_flops=throughput * t_flop,
        token_flop_per_seq=t_flop,
        decode_weight_gbps=flops.streamed_params(cfg) * m.itemsize / step / 1e9 if step_means else nan,
        peak_rss_bytes=peak_rss_bytes(), threads=m.threads, torch_version=torch.__version__, cpu=env["cpu"],
        seed=spec.seed, date=_now(), repeats=len(timings),
        prompt_flops_min=B * p_flop / max(prompt_times), prompt_flops_max=B * p_flop / min(prompt_times),
        token_throughput_min=B / max(step_means) if step_means else nan,
        token_throughput_max=B / min(step_means) if step_means else nan,
        env=env, **roof,
        extra={"predicted_peak_bytes": p.predicted_peak_bytes, "budget_bytes": p.budget_bytes,
               "activation_bytes": p.activation_bytes, "overhead_bytes": p.overhead_bytes,
               "prefill_chunk": p.prefill_chunk, "prefill_micro_batch": p.prefill_micro_batch,
               "repeat_prompt_time_s": prompt_times, "repeat_decode_time_per_token_s": step_means,
               "decode_matmul": backends.decode_matmul(m.model, m.backend),
               "decode_blocks": backends.decode_blocks(m.model, B),
               # the process's memory on transparent huge pages (weights and KV cache ask for them)
               "huge_page_bytes": huge_page_bytes(),
               # one-time costs, per run, so that their growth with depth can be checked (no
               # per-layer compile or search: docs/performance.md compares 24 and 96 layers)
               "load_s": m.load_s, "prepare_s": m.prepare_s, "warmup_s": m.warmup_s},
    )


def run(spec: RunSpec) -> RunRecord:
    spec.validate()
    cfg = spec.cfg
    backend = backends.resolve(spec.backend, spec.dtype)
    threads = set_threads(spec.threads)
    P, G = spec.prompt_len, spec.gen_len
    itemsize = torch.finfo(DTYPES[spec.dtype]).bits // 8
    log = (lambda *a: None) if spec.quiet else (lambda *a: print("cpugen:", *a, file=sys.stderr))
    p = plan_batch(spec, itemsize, backend)
    log(f"{cfg.name}: {cfg.n_layer} layers, {count(flops.n_params(cfg))} parameters; " + needs(p, backend, threads))
    m = load(spec, backend, threads)
    timings = measure(spec, m, p, repeats=1, warmup=int(spec.warmup))
    log(f"weights ready in {m.load_s:.1f} s, backend in {m.prepare_s:.1f} s, warm-up {m.warmup_s:.1f} s "
        f"(backend and warm-up together: {1e3 * (m.prepare_s + m.warmup_s) / cfg.n_layer:.0f} ms a layer, "
        "counting any first build of the native kernels)")
    rec = make_record(spec, m, p, timings)
    note = stale_limits_note(rec)
    if note:
        print(note, file=sys.stderr)
    return rec


def needs(p, backend: str, threads: int) -> str:
    """What a batch needs, said before anything large is allocated."""
    return (f"batch {p.batch_size} needs {p.weight_bytes / GiB:.2f} GiB of weights + {p.kv_cache_bytes / GiB:.2f} "
            f"GiB of KV cache ({p.prompt_len + p.gen_len} tokens a sequence) + {p.activation_bytes / GiB:.2f} GiB "
            f"of activations" + (f" (less than the {p.repack_bytes / GiB:.2f} GiB matrix held twice while it is "
                                 f"repacked, before the cache exists)"
                                 if p.repack_bytes > p.kv_cache_bytes + p.activation_bytes else "")
            + f": predicted peak {p.predicted_peak_bytes / GiB:.2f} GiB of a {p.budget_bytes / GiB:.2f} "
            f"GiB budget; backend {backend}, {threads} threads")
