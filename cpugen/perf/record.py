"""One record for a run's results; the markdown table, JSON, JSONL and CSV are views of it.

A sweep's row is the same record: `status` says whether it ran ("ok") or why not (e.g. "does not
fit (needs X GiB, budget Y GiB)", whose measured figures are then None); with several repeats the
figures are medians over repeats, with min and max beside them and the per-repeat values in extra.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field

GiB = 1024**3


def count(n: float) -> str:
    """1.41e9 -> '1.41B', 78144 -> '78.1K'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


@dataclass
class RunRecord:
    model: str
    backend: str
    dtype: str
    batch_size: int
    prompt_len: int
    gen_len: int
    n_layer: int
    n_params: int
    weight_bytes: int
    kv_cache_bytes: int
    prompt_time_s: float  # wall time of the prompt pass for the whole batch
    prompt_flops: float  # FLOP/s of the prompt pass: B x prompt FLOPs / prompt time
    prompt_flop_per_seq: float
    decode_time_per_token_s: float  # mean wall time of one decode step for the whole batch
    decode_time_median_s: float
    decode_time_min_s: float
    decode_time_max_s: float
    decode_steps: int
    token_throughput: float  # tokens/s: B / decode time per step
    token_flops: float  # FLOP/s in decode: throughput x FLOPs per token
    token_flop_per_seq: float
    decode_weight_gbps: float  # weight bytes streamed per step / decode time per step, 1e9 B/s
    peak_rss_bytes: int
    threads: int
    torch_version: str
    cpu: str
    seed: int = 0
    status: str = "ok"  # or why the batch did not run: "does not fit (needs X GiB, budget Y GiB)"
    sweep: str | None = None  # the sweep and setting this row belongs to (cpugen bench, scripts/nightly)
    setting: str | None = None
    date: str | None = None  # when it was measured, ISO 8601 UTC
    repeats: int = 1  # timed prefill+decode runs behind each figure (the median of them)
    prompt_flops_min: float | None = None  # spread over repeats
    prompt_flops_max: float | None = None
    token_throughput_min: float | None = None
    token_throughput_max: float | None = None
    # against this machine's limits (cpugen/roofline.py), with the threads in use
    roofline_read_gbps: float | None = None
    roofline_bf16_tflops: float | None = None
    decode_roofline_s: float | None = None  # max(bytes moved / bandwidth, FLOPs / peak) per step
    decode_efficiency: float | None = None  # decode_roofline_s / decode_time_per_token_s
    prefill_efficiency: float | None = None  # prompt_flops / bf16 peak
    env: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        env = d.pop("env")
        extra = d.pop("extra")
        return {**d, **{k: v for k, v in env.items() if k not in d}, **extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """Inverse of to_dict: fields by name, the environment's keys into env, the rest into extra."""
        names = {f.name for f in dataclasses.fields(cls)} - {"env", "extra"}
        env = {k: d[k] for k in ENV_KEYS if k in d}
        extra = {k: v for k, v in d.items() if k not in names and k not in ENV_KEYS}
        return cls(**{k: v for k, v in d.items() if k in names}, env=env, extra=extra)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# What cpugen.env.environment() records (some also record fields): to_dict flattens them beside the
# fields, from_dict puts them back.
ENV_KEYS = ("cpu", "avx2", "avx512", "avx512_bf16", "amx_bf16", "isa", "cpu_isa", "cores", "threads", "memory_bytes", "torch_version",
            "torch_cpu_capability", "library_caps", "ipex_version", "python_version", "commit", "placement", "knobs", "knobs_key")


# The reference page's columns, then what cpugen adds.
COLUMNS = [
    ("Batch size", lambda r: f"{r.batch_size}"),
    ("Prompt time", lambda r: _num(r.prompt_time_s, ".2f", " s")),
    ("Prompt FLOPS", lambda r: _num(r.prompt_flops, ".3f", " TFLOPS", 1e12)),
    ("Generate time per token per batch", lambda r: _num(r.decode_time_per_token_s, ".3f", " s")),
    ("Token throughput", lambda r: _num(r.token_throughput, ".2f", " tok/s")),
    ("Token FLOPS", lambda r: _num(r.token_flops, ".3f", " TFLOPS", 1e12)),
    ("Decode weight GB/s", lambda r: _num(r.decode_weight_gbps, ".1f")),
    ("Decode vs roofline", lambda r: _pct(decode_vs_limits(r))),
    ("Prefill vs peak", lambda r: _pct(prefill_vs_limits(r))),
    ("Peak RSS", lambda r: _num(r.peak_rss_bytes, ".2f", " GiB", GiB)),
]


def against_hw(r: RunRecord) -> bool:
    """Whether the record has the register-only limit of the level its matmuls ran at (x86): its
    views then judge prefill and decode against that, not against torch.mm's rate."""
    return r.extra.get("hw_tflops") is not None


def decode_vs_limits(r: RunRecord) -> float | None:
    """Decode's roofline (the read bandwidth, and the level's hardware limit where known) / the step."""
    return r.extra.get("decode_efficiency_hw") if against_hw(r) else r.decode_efficiency


def prefill_vs_limits(r: RunRecord) -> float | None:
    """Prompt FLOPS / the level's hardware limit where known, else / torch.mm's bf16 rate."""
    return r.extra.get("prefill_efficiency_hw") if against_hw(r) else r.prefill_efficiency


def limits_line(rows: list[RunRecord]) -> str | None:
    """What the efficiency columns are against: the peak (the level's register-only limit, or
    torch.mm's rate where there is none) and where the read bandwidth came from; torch.mm's rate
    stays in the record (roofline_bf16_tflops, prefill_efficiency) beside it."""
    rows = [r for r in rows if r.ok and r.roofline_read_gbps]
    if not rows:
        return None

    def span(xs, fmt):
        lo, hi = min(xs), max(xs)
        return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"

    src = rows[0].extra.get("limits_source") or "cached (python -m cpugen roofline)"
    read = (f"read {span([r.roofline_read_gbps for r in rows], '.1f')} GB/s, "
            f"{'measured right before and after each row' if src.startswith('measured') else src}")
    mm = f"torch.mm's bf16 rate {span([r.roofline_bf16_tflops for r in rows], '.3f')} TFLOP/s"
    hw = [r for r in rows if against_hw(r)]
    if hw:
        by = hw[0].extra.get("hw_limit_by") or hw[0].extra["hw_level"]
        how = "" if by == hw[0].extra["hw_level"] else f" ({by}'s instruction, the faster one here)"
        return (f"- Limits: {read}; peak: the {hw[0].extra['hw_level']} level's register-only limit{how}, "
                f"{span([r.extra['hw_tflops'] for r in hw], '.3f')} TFLOP/s ({mm} is in the record: "
                f"prefill at {span([100 * r.prefill_efficiency for r in hw], '.0f')}% of it)")
    return f"- Limits: {read}; peak: {mm} (no register-only limit for this CPU)"


def _num(x: float | None, fmt: str, unit: str = "", scale: float = 1) -> str:
    """A figure in its unit, or "-" where the run has none (no decode step at --gen-len 1)."""
    return "-" if x is None else f"{format(x / scale, fmt)}{unit}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


# A sweep's table adds the spread over repeats.
SWEEP_COLUMNS = COLUMNS + [
    ("Token throughput min / max", lambda r: f"{_num(r.token_throughput_min, '.2f')} / {_num(r.token_throughput_max, '.2f')}"),
    ("Prompt FLOPS min / max", lambda r: f"{_num(r.prompt_flops_min, '.3f', '', 1e12)} / {_num(r.prompt_flops_max, '.3f', '', 1e12)}"),
    ("Repeats", lambda r: f"{r.repeats}"),
]


def markdown(records: list[RunRecord], columns=COLUMNS) -> str:
    """The reference page's table; a batch that did not run says why in place of its figures."""
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    rule = "|" + "|".join("-" * (len(c) + 2) for c, _ in columns) + "|"

    def row(r):
        cells = [r.status] + ["-"] * (len(columns) - 2) if not r.ok else [f(r) for _, f in columns[1:]]
        auto = " (auto)" if r.extra.get("batch_request") == "auto" else ""  # the planner's pick
        return [f"{r.batch_size}{auto}"] + cells

    return "\n".join([head, rule, *("| " + " | ".join(row(r)) + " |" for r in records)])


def jsonl(records: list[RunRecord]) -> str:
    """One JSON object a line (the history file's format)."""
    return "".join(r.to_json() + "\n" for r in records)


def csv_text(records: list[RunRecord]) -> str:
    """Every key of every record a column (in first-seen order); None is empty, lists are JSON."""
    rows = [r.to_dict() for r in records]
    keys = list(dict.fromkeys(k for d in rows for k in d))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(keys)
    for d in rows:
        w.writerow(["" if d.get(k) is None else json.dumps(d[k]) if isinstance(d[k], (list, dict)) else d[k]
                    for k in keys])
    return out.getvalue()


def summary(r: RunRecord) -> str:
    """The setting above the table, like the reference page's bullet list."""
    return "\n".join([
        f"- Model: {r.model}, {r.n_layer} layers, {count(r.n_params)} parameters in {r.dtype} "
        f"({r.weight_bytes / GiB:.2f} GiB of weights), backend {r.backend}",
        f"- Input sequence length: {r.prompt_len}; generate sequence length: {r.gen_len}",
        f"- FLOPs for a token: {r.token_flop_per_seq / 1e12:.4g} TFLOPs; "
        f"for a sequence's prompt: {r.prompt_flop_per_seq / 1e12:.4g} TFLOPs",
        f"- KV cache: {r.kv_cache_bytes / GiB:.2f} GiB; CPU: {r.cpu}, {r.threads} threads, torch {r.torch_version}",
        f"- Decode step times: median {r.decode_time_median_s:.4f} s, min {r.decode_time_min_s:.4f} s, "
        f"max {r.decode_time_max_s:.4f} s over {r.decode_steps} steps" if r.decode_steps
        else "- Decode step times: none (one generated token: the prompt pass alone is timed)",
    ] + [x for x in (limits_line([r]),) if x])


def environment_line(r: RunRecord) -> str:
    """Where a record was measured, in one line."""
    env = r.to_dict()
    flags = ", ".join(f"{k} {'yes' if env.get(k) else 'no'}" for k in ("avx512_bf16", "amx_bf16"))
    mem = f"{env['memory_bytes'] / GiB:.0f} GiB" if env.get("memory_bytes") else "? GiB"
    return (f"CPU: {r.cpu} ({flags}), {env.get('cores', '?')} cores, {r.threads} threads, {mem} memory; "
            f"torch {r.torch_version}, IPEX {env.get('ipex_version') or 'none'}, backend {r.backend}; "
            f"commit {env.get('commit') or 'unknown'}; {r.date or ''}")


def sweep_markdown(records: list[RunRecord]) -> str:
    """A sweep as the reference page shows it: per setting, the setting above its table."""
    out = []
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.sweep, r.setting, r.prompt_len, r.gen_len), []).append(r)
    for (sweep, setting, P, G), rows in groups.items():
        r = rows[0]
        title = " / ".join(x for x in (sweep, setting) if x) or f"{P}+{G}"
        out += [f"### {title}", "",
                f"- Model: {r.model}, {r.n_layer} layers, {count(r.n_params)} parameters in {r.dtype} "
                f"({r.weight_bytes / GiB:.2f} GiB of weights), backend {r.backend}",
                f"- Input sequence length: {P}; generate sequence length: {G}",
                f"- FLOPs for a token: {r.token_flop_per_seq / 1e12:.4g} TFLOPs; "
                f"for a sequence's prompt: {r.prompt_flop_per_seq / 1e12:.4g} TFLOPs",
                f"- Figures are medians over {max(x.repeats for x in rows)} repeats; " + environment_line(r),
                *[x for x in (limits_line(rows),) if x],
                "", markdown(rows, SWEEP_COLUMNS), ""]
    return "\n".join(out)
