"""The measurement behind `cpugen run` and every `bench` row: the reference's throughput experiment.

Synthetic random prompt tokens (like the reference), a short warm-up over the same cache, then the
prompt pass timed as a whole and every decode step timed on its own; the result is one RunRecord
(record.py), assembled in one place (`make_record`) for rows that ran and rows that did not.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch

from cpugen import knobs
from cpugen.errors import CpugenError
from cpugen.host.environment import environment
from cpugen.host.memory import huge_page_bytes, peak_rss_bytes, reset_peak_rss
from cpugen.model import shapes
from cpugen.model.config import ModelConfig
from cpugen.model.kv_cache import kv_cache_bytes
from cpugen.model.weights import weight_bytes
from cpugen.perf import flops
from cpugen.perf.record import GiB, RunRecord, against_hw, count, decode_vs_limits, prefill_vs_limits
from cpugen.progress import progress
from cpugen.runtime import eager, planner, stack
from cpugen.runtime.engine import Engine, Prompts, compute_context
from cpugen.runtime.sampling import argmax
from cpugen.runtime.session import Session, log, open_session


@dataclass
class RunSpec:
    """`cpugen run`'s request: a model, one batch (or "auto") at one setting."""
    model: str
    batch_size: int | str  # or "auto": the planner's largest batch
    prompt_len: int
    gen_len: int
    layers: int | None = None
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


@dataclass
class Timing:
    """One repeat of the measured work: the prompt pass, then every decode step on its own."""
    prompt_time_s: float
    steps: list[float]
    comm_s: float = 0.0  # tensor parallel: seconds of the decode steps spent in collectives
    comm_bytes: int = 0  # and the bytes this rank contributed to them
    comm_calls: int = 0


def decode_roofline_s(cfg: ModelConfig, roof, batch: int, prompt_len: int, gen_len: int, itemsize: int) -> float | None:
    """Mean over the run's decode steps of the roofline time: the weights streamed once per step
    plus the KV cache read at that step's context, against bandwidth; the step's FLOPs against peak.
    None for a run without decode steps (one generated token)."""
    weights = shapes.streamed_params(cfg) * itemsize
    times = []
    for c in range(prompt_len + 1, prompt_len + gen_len):  # keys attended by each decode step
        kv_read = kv_cache_bytes(cfg, batch, c, itemsize)
        times.append(roof.step_time(weights + kv_read, batch * flops.token_flops(cfg, c)))
    return statistics.fmean(times) if times else None


def _roofline(cfg, B, P, G, itemsize, threads, step, prompt_flops, limits=None) -> dict:
    """The record's limits and efficiencies: against the limits read around the row where there are
    some (`limits`: the readings before and after), else against the cached ones."""
    from cpugen.perf import roofline

    roof = roofline.between(*limits) if limits else roofline.get(threads)
    ideal = decode_roofline_s(cfg, roof, B, P, G, itemsize)
    out = dict(roofline_read_gbps=roof.read_gbps, roofline_bf16_tflops=roof.bf16_tflops, decode_roofline_s=ideal,
               decode_efficiency=ideal / step if step and ideal else None,
               prefill_efficiency=prompt_flops / (roof.bf16_tflops * 1e12))
    # against the hardware: the register-only limit of the ISA level the matmuls ran at
    level = roofline.run_level()
    by, hw = roofline.level_limit(roofline.hw_limits(threads), level)
    if hw:
        extra = _against_hw(cfg, roof, B, P, G, itemsize, step, prompt_flops, level, by, hw)
        if max(extra["prefill_efficiency_hw"], extra["decode_efficiency_hw"] or 0) > 1:  # a cached limit read low
            by, hw = roofline.level_limit(roofline.hw_limits(threads, beaten=True), level)
            extra = _against_hw(cfg, roof, B, P, G, itemsize, step, prompt_flops, level, by, hw)
        out["extra"] = extra
    return out


def _against_hw(cfg, roof, B, P, G, itemsize, step, prompt_flops, level, by, hw) -> dict:
    ideal_hw = decode_roofline_s(cfg, replace(roof, bf16_tflops=hw), B, P, G, itemsize)
    # hw_limit_by: the level whose instruction gives the limit (roofline.level_limit)
    return {"hw_level": level, "hw_limit_by": by, "hw_tflops": hw, "prefill_efficiency_hw": prompt_flops / (hw * 1e12),
            "decode_efficiency_hw": ideal_hw / step if step and ideal_hw else None}


def limits_extra(limits) -> dict:
    """Where the record's limits came from, and the readings behind them."""
    if not limits:
        return {"limits_source": "cached (python -m cpugen roofline)"}
    return {"limits_source": "measured around this row",
            **{f"limits_{when}": {"read_gbps": r.read_gbps, "bf16_tflops": r.bf16_tflops}
               for when, r in zip(("before", "after"), limits)}}


STALE_LIMITS = 1.0  # no efficiency above 100% goes out without a word on which limit it beat


def stale_limits_note(rec: RunRecord) -> str | None:
    """A line for stderr when a run beat the limits its views judge it against (record.py's
    decode_vs_limits, prefill_vs_limits). Cached ones: the machine is in a faster regime than when
    `cpugen roofline` measured it (shared hosts swing), so its efficiencies overstate. Ones read
    around the row: the machine moved during the row. A register-only limit a run beat has been
    measured again already (_roofline): a figure still above it says so."""
    over = [f"{name} {100 * eff:.0f}%" for name, eff in (("decode", decode_vs_limits(rec)),
                                                        ("prefill", prefill_vs_limits(rec)))
            if eff is not None and eff > STALE_LIMITS]
    if not over:
        return None
    peak = (f"{rec.extra['hw_tflops']:.3f} TFLOP/s, the {rec.extra['hw_level']} level's register-only limit"
            if against_hw(rec) else f"{rec.roofline_bf16_tflops:.3f} TFLOP/s, torch.mm's bf16 rate")
    limits = f"{rec.roofline_read_gbps:.1f} GB/s, {peak}"
    if str(rec.extra.get("limits_source", "")).startswith("measured"):
        return (f"cpugen: note: this run beat the limits read right before and after it ({', '.join(over)} of "
                f"{limits}): the machine moved between regimes during the run; its efficiencies overstate")
    return (f"cpugen: note: this run beat the cached limits ({', '.join(over)} of them; "
            f"{limits}): the machine is faster "
            f"now than when they were measured; refresh them with `python -m cpugen roofline --refresh`")


def measure(s: Session, p: planner.Plan, prompt_len: int, gen_len: int, repeats: int = 1, warmup: int = 1,
            decode_steps: int | None = None) -> tuple[list[Timing], float]:
    """`warmup` short warm-up passes, then `repeats` timed prompt passes and decode runs of batch
    p.batch_size, all over one KV cache allocated once (and freed at the end). Returns the timings
    and the seconds spent readying the batch and warming up."""
    cfg, B, P, G = s.cfg, p.batch_size, prompt_len, gen_len
    t_warm = time.perf_counter()
    s.ready_for(B)
    engine = Engine(s.model, B, P + G, s.dtype, s.forward, p.prefill_chunk, p.prefill_micro_batch)
    gen = torch.Generator().manual_seed(s.seed)
    prompts = Prompts(torch.randint(cfg.vocab_size, (B, P), generator=gen), torch.ones(B, P, dtype=torch.bool))
    n_steps = G - 1 if decode_steps is None else min(decode_steps, G - 1)
    slow = knobs.current().test_slowdown
    timings = []
    try:
        with compute_context(s.dtype):
            for _ in range(warmup):  # first calls pay for allocator growth, kernel selection and prepacking
                w = min(P, 16)
                logits = engine.prefill(Prompts(prompts.tokens[:, :w], prompts.valid[:, :w]))
                for _ in range(min(2, G - 1)):
                    logits = engine.decode_one_token(argmax(logits))
                engine.reset()
            warmup_s = time.perf_counter() - t_warm
            s.model.decode_paths.clear()  # what ran the timed steps, for the record
            bar = progress("prefill+decode", s.quiet)
            for r in range(repeats):
                if r:
                    engine.reset()
                t0 = time.perf_counter()
                logits = engine.prefill(prompts)
                tok = argmax(logits)
                if slow:  # a planted regression (CPUGEN_TEST_SLOWDOWN), inside the timed prefill
                    time.sleep(slow * (time.perf_counter() - t0))
                prompt_time = time.perf_counter() - t0
                if s.group:
                    s.group.reset()  # from here: the decode steps' collectives
                steps = []
                for i in range(n_steps):
                    t0 = time.perf_counter()
                    logits = engine.decode_one_token(tok)
                    tok = argmax(logits)
                    if slow:  # a planted regression (CPUGEN_TEST_SLOWDOWN), inside the timed step
                        time.sleep(slow * (time.perf_counter() - t0))
                    steps.append(time.perf_counter() - t0)
                    if bar:
                        bar.update(r * n_steps + i + 1, repeats * n_steps, "decode steps")
                if not torch.isfinite(logits.float()).all():
                    raise CpugenError("the model produced non-finite logits: the weights or the dtype are unusable")
                g = s.group
                timings.append(Timing(prompt_time, steps, *((g.comm_s, g.comm_bytes, g.comm_calls) if g else ())))
    finally:
        s.model.free_caches()
    return timings, warmup_s


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


MEASURED = ("prompt_time_s", "prompt_flops", "decode_time_per_token_s", "decode_time_median_s", "decode_time_min_s",
            "decode_time_max_s", "token_throughput", "token_flops", "decode_weight_gbps", "peak_rss_bytes")


def make_record(s: Session, p: planner.Plan, prompt_len: int, gen_len: int, timings: list[Timing] | None,
                roofline: bool = True, status: str = "ok", warmup_s: float = 0.0, extra: dict | None = None,
                limits=None, peak_rss: int | None = None) -> RunRecord:
    """The record of one batch size. With timings, each figure is the median over repeats (min and
    max beside it) and decode step statistics pool every step of every repeat; without (a row that
    did not run), the measured figures are None and `status` says why. `limits`: the machine's
    limits read right before and after the row (roofline.probe), else the cached ones are used;
    `peak_rss`: the row's peak, read before anything after it (the second probe) could raise it."""
    cfg, B, P, G = s.cfg, p.batch_size, prompt_len, gen_len
    p_flop, t_flop = flops.prompt_flops(cfg, P), flops.mean_token_flops(cfg, P, G)
    env = environment(s.threads)
    common = dict(model=cfg.name, backend=s.backend, dtype=s.dtype_name, batch_size=B, prompt_len=P, gen_len=G,
                  n_layer=cfg.n_layer, n_params=shapes.n_params(cfg), kv_cache_bytes=p.kv_cache_bytes,
                  prompt_flop_per_seq=p_flop, token_flop_per_seq=t_flop, threads=s.threads,
                  torch_version=torch.__version__, cpu=env["cpu"], seed=s.seed, date=_now(), status=status, env=env)
    plan_extra = {"predicted_peak_bytes": p.predicted_peak_bytes, "needed_bytes": planner.needed(p),
                  "budget_bytes": p.budget_bytes, "budget_source": p.budget_source,
                  "activation_bytes": p.activation_bytes, "overhead_bytes": p.overhead_bytes,
                  "prefill_chunk": p.prefill_chunk, "prefill_micro_batch": p.prefill_micro_batch, **(extra or {})}
    if timings is None:
        return RunRecord(**common, weight_bytes=p.weight_bytes, decode_steps=0, repeats=0,
                         **dict.fromkeys(MEASURED), extra=plan_extra)
    peak = peak_rss_bytes() if peak_rss is None else peak_rss  # this rank's, before any later probe
    prompt_times = [t.prompt_time_s for t in timings]
    step_means = [statistics.fmean(t.steps) for t in timings if t.steps]
    all_steps = [x for t in timings for x in t.steps]
    prompt_time = statistics.median(prompt_times)
    # a run of one generated token (--gen-len 1) has no decode step: its decode figures are None
    # (views print "-", JSON null), its prefill's are measured and judged as any other
    step = statistics.median(step_means) if step_means else None
    throughput = B / step if step else None
    roof = _roofline(cfg, B, P, G, s.itemsize, s.threads, step, B * p_flop / prompt_time, limits) if roofline else {}
    hw_extra = roof.pop("extra", {})
    return RunRecord(
        **common, weight_bytes=weight_bytes(s.model), prompt_time_s=prompt_time, prompt_flops=B * p_flop / prompt_time,
        decode_time_per_token_s=step, decode_time_median_s=statistics.median(all_steps) if all_steps else None,
        decode_time_min_s=min(all_steps, default=None), decode_time_max_s=max(all_steps, default=None),
        decode_steps=len(timings[0].steps), token_throughput=throughput,
        token_flops=throughput * t_flop if step else None,
        decode_weight_gbps=shapes.streamed_params(cfg) * s.itemsize / step / 1e9 if step else None,
        peak_rss_bytes=peak, repeats=len(timings),
        prompt_flops_min=B * p_flop / max(prompt_times), prompt_flops_max=B * p_flop / min(prompt_times),
        token_throughput_min=B / max(step_means) if step else None,
        token_throughput_max=B / min(step_means) if step else None, **roof,
        extra={**plan_extra, "repeat_prompt_time_s": prompt_times, "repeat_decode_time_per_token_s": step_means,
               "decode_matmul": eager.decode_matmul(s.model, s.backend, B),
               # the packed kernel's instruction above 6 rows (prefill's), where the weights are packed
               "packed_multiply": eager.packed_multiply(s.model) if s.backend == "eager" else None,
               # the AVX2 level's measured layout choice and its figures (runtime/layout.py), or None
               "layout_choice": s.layout_choice,
               # what ran the timed decode steps, counted as they ran
               "decode_blocks": stack.observed(s.model.decode_paths),
               "decode_stack_refused": getattr(s.model, "stack_refused", None),
               # the process's memory on transparent huge pages (weights and KV cache ask for them)
               "huge_page_bytes": huge_page_bytes(),
               # one-time costs, per run, so that their growth with depth can be checked (no
               # per-layer compile or search: docs/performance.md, "One-time costs by depth")
               "load_s": s.load_s, "prepare_s": s.prepare_s, "warmup_s": warmup_s,
               **(limits_extra(limits) if roof else {}), **hw_extra, **split_extra(s, timings, step, peak)})


def split_extra(s: Session, timings: list[Timing], step: float, peak: int) -> dict:
    """A tensor-parallel run's figures: its ranks and hosts, each rank's peak RSS (gathered from
    every rank: a collective, so every rank records every row), and what the collectives cost a
    decode step on this rank."""
    g = s.group
    if g is None:
        return {"tp": 1}
    from cpugen.runtime import distributed

    peaks = distributed.gather_object(g, peak)
    steps = sum(len(t.steps) for t in timings) or 1
    comm = sum(t.comm_s for t in timings) / steps
    return {"tp": g.world, "tp_hosts": g.hosts, "tp_comm": g.comm, "tp_rank_peak_rss_bytes": peaks,
            "tp_max_rank_peak_rss_bytes": max(peaks), "tp_comm_s_per_step": comm,
            "tp_comm_share": comm / step if step else None,
            "tp_comm_bytes_per_step": sum(t.comm_bytes for t in timings) // steps,
            "tp_collectives_per_step": sum(t.comm_calls for t in timings) / steps}


def note_stale(rec: RunRecord):
    note = stale_limits_note(rec)
    if note:
        print(note, file=sys.stderr)


def run(spec: RunSpec) -> RunRecord:
    s = open_session(spec.model, layers=spec.layers, backend=spec.backend, dtype=spec.dtype, threads=spec.threads,
                     seed=spec.seed, quiet=spec.quiet)
    cfg, say = s.cfg, log(spec.quiet)
    p = s.plan(spec.prompt_len, spec.gen_len, spec.batch_size, spec.memory_budget, spec.host_memory,
               spec.max_batch_size, spec.check_fit)
    say(f"{cfg.name}: {cfg.n_layer} layers, {count(shapes.n_params(cfg))} parameters; " + needs(p, s))
    s.load()
    around = spec.roofline and knobs.current().limits == "measured"
    if around:  # the probe's buffer must not count as the run's memory: the peak before it, then afresh
        hwm = peak_rss_bytes()
        before = roofline_probe(s)
        if not reset_peak_rss():
            hwm = None  # cannot start afresh: the peak below includes the probe, as the record says
    timings, warmup_s = measure(s, p, spec.prompt_len, spec.gen_len, 1, int(spec.warmup), spec.decode_steps)
    peak = peak_rss_bytes() if not around or hwm is None else max(hwm, peak_rss_bytes())
    limits = (before, roofline_probe(s)) if around else None
    say(f"weights ready in {s.load_s:.1f} s, backend in {s.prepare_s:.1f} s, warm-up {warmup_s:.1f} s "
        f"(backend and warm-up together: {1e3 * (s.prepare_s + warmup_s) / cfg.n_layer:.0f} ms a layer, "
        "counting any first build of the native kernels)")
    rec = make_record(s, p, spec.prompt_len, spec.gen_len, timings, spec.roofline, warmup_s=warmup_s, limits=limits,
                      peak_rss=peak)
    note_stale(rec)
    return rec


def roofline_probe(s: Session):
    """The machine's limits now, in about a second (perf/roofline.py's probe), with the run's threads."""
    from cpugen.perf import roofline

    return roofline.probe(s.threads)


def needs(p: planner.Plan, s: Session) -> str:
    """What a batch needs, said before anything large is allocated."""
    return (f"batch {p.batch_size} needs {p.weight_bytes / GiB:.2f} GiB of weights + {p.kv_cache_bytes / GiB:.2f} "
            f"GiB of KV cache ({p.prompt_len + p.gen_len} tokens a sequence) + {p.activation_bytes / GiB:.2f} GiB "
            f"of activations" + (f" (less than the {p.repack_bytes / GiB:.2f} GiB matrix held twice while it is "
                                 f"repacked, before the cache exists)"
                                 if p.repack_bytes > p.kv_cache_bytes + p.activation_bytes else "")
            + f": predicted peak {p.predicted_peak_bytes / GiB:.2f} GiB of a {p.budget_bytes / GiB:.2f} "
            f"GiB budget; backend {s.backend}, {s.threads} threads")
