"""One record for a run's results; the table, JSON and CSV are views of it."""

from __future__ import annotations

import dataclasses
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


# The reference page's columns, then what cpugen adds.
COLUMNS = [
    ("Batch size", lambda r: f"{r.batch_size}"),
    ("Prompt time", lambda r: f"{r.prompt_time_s:.2f} s"),
    ("Prompt FLOPS", lambda r: f"{r.prompt_flops / 1e12:.3f} TFLOPS"),
    ("Generate time per token per batch", lambda r: f"{r.decode_time_per_token_s:.3f} s"),
    ("Token throughput", lambda r: f"{r.token_throughput:.2f} tok/s"),
    ("Token FLOPS", lambda r: f"{r.token_flops / 1e12:.3f} TFLOPS"),
    ("Decode weight GB/s", lambda r: f"{r.decode_weight_gbps:.1f}"),
    ("Decode vs roofline", lambda r: _pct(r.decode_efficiency)),
    ("Prefill vs peak", lambda r: _pct(r.prefill_efficiency)),
    ("Peak RSS", lambda r: f"{r.peak_rss_bytes / GiB:.2f} GiB"),
]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(records: list[RunRecord]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    rule = "|" + "|".join("-" * (len(c) + 2) for c, _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(f(r) for _, f in COLUMNS) + " |" for r in records]
    return "\n".join([head, rule, *rows])


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
        f"max {r.decode_time_max_s:.4f} s over {r.decode_steps} steps",
    ] + ([f"- Limits of this machine at {r.threads} threads: {r.roofline_read_gbps:.1f} GB/s read, "
          f"{r.roofline_bf16_tflops:.3f} TFLOP/s bf16 matmul (python -m cpugen roofline)"]
         if r.roofline_read_gbps else []))
