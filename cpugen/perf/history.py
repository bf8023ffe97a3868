"""The performance history: an append-only JSONL file of result records, and regressions against it.

Writing: each record is one line, written by a single write() on a file opened with O_APPEND, then
fsync'd, so a crash or a kill leaves every earlier line whole; at worst the last line is cut short.
A file that does not end in a newline (a write cut short) gets one before the next record, so the
fragment stays a line of its own and never swallows a good record.

Reading: a line that is not a JSON object with the grouping key's fields (a truncated or corrupt
line) is reported and skipped; every other line is kept.

Comparing (`Rule`): each figure of a record is compared with the last `window` records of the same
configuration (KEY: same machine, model, backend, setting, batch, threads and knobs). A figure is
worse when it is beyond the window's median by more than `threshold` AND by more than `k` times the
window's spread (its median absolute deviation, scaled to a standard deviation): a figure that
swings 8% run to run needs far more than 10% to count. For throughput and prompt FLOPS the spread
test may be passed by the figure divided by the limits read around each row instead, where that
view is steadier (a decode that follows the host's bandwidth regimes). Token throughput and prompt FLOPS are also
judged with the machine's limits divided out (decode and prefill efficiency, against the limits read
right before and after each row): a raw figure worse with the normalized one steady (within the
threshold of its median) is the host, in a slower regime, which the report names without failing;
with the normalized one down too, it is the code. The exemption holds only where the figure follows
its limit: where the normalized figure's history is no noisier than the raw one's, or where the
figure runs near its limit (NEAR_LIMIT of it or more), which then bounds it. Elsewhere (a decode
bound by widening bf16, far below the read bandwidth) dividing by the limit only adds the limit's
noise, and a coincident dip of the limit would excuse a real drop; the raw figure alone decides
there. A worse figure from a row in which the OS counted others (hypervisor
steal, other processes: host/contention.py) as taking more than HOST_BUSY of the CPUs' time beyond
their median over the window is the host's too. Peak memory, which no regime moves, is judged raw. A regression
is then measured again (the nightly job's `--confirm`): one that a re-measure of the same row does
not reproduce was a passing disturbance ("transient"); re-measures are kept in the history, marked
`confirmation`, and never count as runs of their own.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cpugen.errors import CpugenError

KEY = ("cpu", "model", "n_layer", "backend", "dtype", "prompt_len", "gen_len", "batch_size", "threads")
# ... and the CPUGEN_* knobs that change what runs, where not at their defaults (knobs.py); a record
# written before knobs were recorded ran with the defaults
KNOBS_KEY = "knobs_key"
# figure -> +1 when higher is better (a drop regresses), -1 when lower is better (growth regresses)
TRACKED = {"token_throughput": +1, "prompt_flops": +1, "peak_rss_bytes": -1}


# --- writing ---------------------------------------------------------------------------------------------
def append(path: Path, records) -> None:
    """Appends records (RunRecord or dict) as one line each; durable when this returns."""
    path = Path(path)
    new = not path.exists()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise CpugenError(f"cannot open history {path}: {e.strerror}") from None
    try:
        for r in records:
            d = r.to_dict() if hasattr(r, "to_dict") else r
            line = (json.dumps(d, allow_nan=True) + "\n").encode()
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line cut short before: end it first
                line = b"\n" + line
            _write_all(fd, line)
            os.fsync(fd)
    except OSError as e:
        raise CpugenError(f"cannot write history {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if new:  # the new file's name must survive a crash too
        try:
            dfd = os.open(path.parent if str(path.parent) else ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def _write_all(fd: int, data: bytes):
    """One write() in the normal case; a short write (disk full, a signal) continues where it stopped."""
    while data:
        n = os.write(fd, data)
        data = data[n:]


# --- reading ---------------------------------------------------------------------------------------------
@dataclass
class History:
    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # lines skipped, and why


def read(path: Path) -> History:
    """Every good record in file order; a missing file is an empty history."""
    path = Path(path)
    h = History()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return h
    except OSError as e:
        raise CpugenError(f"cannot read history {path}: {e.strerror}") from None
    lines = data.split(b"\n")
    last = len(lines) - 1  # after the final newline: b"" for a whole file
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        why = None
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            d, why = None, f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})"
        if why is None and not isinstance(d, dict):
            why = "not a JSON object"
        if why is None:
            missing = [k for k in KEY if k not in d]
            if missing:
                why = f"missing {', '.join(missing)}"
        if why is not None:
            cut = " (truncated: an interrupted write)" if i == last else ""
            h.problems.append(f"{path}:{i + 1}: skipped a corrupt line{cut}: {why}")
            continue
        h.records.append(d)
    return h


# --- comparing -------------------------------------------------------------------------------------------
def key(d: dict) -> tuple:
    # a tensor-parallel run is its own configuration (a record from before `tp` existed ran one process)
    return (*(d.get(k) for k in KEY), d.get(KNOBS_KEY) or "", d.get("tp") or 1)


def describe(d: dict) -> str:
    """A configuration in a few words: 'gptj-1b/1L eager bfloat16 16+4 batch 2, 2 threads'."""
    where = f"{d.get('sweep')}/{d.get('setting')} " if d.get("setting") else ""
    knobs = f", {d[KNOBS_KEY]}" if d.get(KNOBS_KEY) else ""
    knobs += f", tp {d['tp']}" if (d.get("tp") or 1) > 1 else ""
    return (f"{where}{d['model']}/{d['n_layer']}L {d['backend']} {d['dtype']} {d['prompt_len']}+{d['gen_len']} "
            f"batch {d['batch_size']}, {d['threads']} threads{knobs}")


def usable(d: dict, figure: str) -> bool:
    v = d.get(figure)
    return (d.get("status", "ok") == "ok" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
            and v > 0)


MAD_TO_SIGMA = 1.4826  # the median absolute deviation of normal data, times this, is its standard deviation


@dataclass(frozen=True)
class Rule:
    """How a regression is decided (README, "How a regression is decided", has the calibration behind
    the defaults)."""
    threshold: float = 0.10  # worse than the window's median by more than this share...
    k: float = 3.0  # ...and by more than k times the window's spread
    window: int = 10  # the last N runs of the configuration
    min_runs: int = 5  # fewer runs than this: the spread is not known yet, the figure is not judged

    def check(self):
        if not 0 < self.threshold < 1:
            raise CpugenError(f"--threshold must be between 0 and 1 (0.10 is 10%), not {self.threshold}")
        if self.window < 1:
            raise CpugenError(f"--window must be at least 1, not {self.window}")
        if self.k < 0:
            raise CpugenError(f"--spread-k must be 0 or more, not {self.k}")
        if not 1 <= self.min_runs <= self.window:
            raise CpugenError(f"--min-runs must be from 1 to --window ({self.window}), not {self.min_runs}")

    def describe(self) -> str:
        return (f"worse than the median of the last {self.window} runs by more than {self.threshold:.0%} and by more "
                f"than {self.k:g} x their spread (MAD as a standard deviation), judged once {self.min_runs} runs exist")


@dataclass
class Judgement:
    """One figure against its window: `worse` when beyond both the threshold and the spread."""
    now: float
    median: float
    sigma: float  # the window's spread: MAD x 1.4826
    runs: int
    sign: int  # +1: higher is better
    rule: Rule

    @property
    def change(self) -> float:
        return (self.now - self.median) / self.median

    @property
    def bound(self) -> float:
        """How far below (or above, for memory) the median a worse run must be, as a share."""
        return max(self.rule.threshold, self.rule.k * self.sigma / self.median)

    @property
    def worse(self) -> bool:
        return self.sign * self.change < -self.bound

    @property
    def spread(self) -> float:
        """The window's spread as a share of its median."""
        return self.sigma / self.median

    @property
    def held(self) -> bool:
        """Within the threshold of the median (whatever the spread): steady."""
        return self.sign * self.change >= -self.rule.threshold

    def text(self, fmt) -> str:
        return (f"{fmt(self.now)} against the median {fmt(self.median)} of the last {self.runs} runs "
                f"({self.change:+.1%}; spread {self.sigma / self.median:.1%}, so worse means beyond "
                f"{self.bound:.1%}: max({self.rule.threshold:.0%}, {self.rule.k:g} x spread))")


def judge(now: float, window: list[float], sign: int, rule: Rule) -> Judgement:
    med = statistics.median(window)
    mad = statistics.median(abs(v - med) for v in window)
    return Judgement(now, med, MAD_TO_SIGMA * mad, len(window), sign, rule)


@dataclass
class Finding:
    record: dict
    figure: str
    now: float
    raw: Judgement | None  # None: no history, or too little to know its spread
    normalized: Judgement | None  # the same with the limits divided out; None where not measured
    runs: int  # how many earlier runs of the configuration there are (in the window)
    rule: Rule = field(default_factory=Rule)
    busy: tuple[float, float] | None = None  # (this row's, the window's median) share of CPU time others took
    retries: list["Finding"] = field(default_factory=list)  # the same figure re-measured to confirm a regression

    @property
    def verdict(self) -> str:
        if self.runs == 0:
            return "new"
        if self.raw is None:
            return "learning"
        n = self.normalized
        # beyond the threshold, and beyond the noise of whichever view is steadier: the raw figure's
        # spread, or the one left once the limits read around each row are divided out
        if self.raw.held or not (self.raw.worse or (n is not None and n.worse)):
            return "ok"
        if n is not None and n.held and self.follows_limit:
            return "host"  # steady against the limits, which the figure follows
        if self.host_busy:
            return "host"  # the OS counted the CPUs as taken by the hypervisor or other processes
        if any(not r.regressed for r in self.retries):
            return "transient"  # a re-measure of the same row did not reproduce it
        return "REGRESSION"

    @property
    def follows_limit(self) -> bool:
        """Whether the figure follows the limits divided out of it: where dividing made its history
        steadier, or where it runs near them (NEAR_LIMIT of them or more at the window's median), where
        nothing else bounds it. The spread comparison alone decides little when the two are close: a
        spread from 10 runs' median absolute deviation is itself uncertain by about a third."""
        n = self.normalized
        return n is not None and (n.spread <= self.raw.spread or n.median >= NEAR_LIMIT)

    @property
    def host_busy(self) -> bool:
        """Others took more of the CPUs during this row than during the history's, by HOST_BUSY."""
        return self.busy is not None and self.busy[0] - self.busy[1] > HOST_BUSY

    def _host_note(self) -> str:
        if self.host_busy:
            return (f"the host was busy, not the code: the OS counted {self.busy[0]:.0%} of the CPUs' time during "
                    f"the row as taken by the hypervisor or other processes (the history's median: "
                    f"{self.busy[1]:.0%})")
        return "the host was slower, not the code: the figure held against the limits measured around it"

    @property
    def regressed(self) -> bool:
        return self.verdict == "REGRESSION"

    @property
    def baseline(self) -> float | None:
        return self.raw.median if self.raw else None

    @property
    def change(self) -> float | None:
        return self.raw.change if self.raw else None

    @property
    def note(self) -> str:
        return {"new": "new configuration: no history to compare with",
                "learning": f"{self.runs} earlier runs: judged from {self.rule.min_runs}, once the spread is known",
                "ok": "ok", "host": self._host_note(),
                "transient": "not reproduced when the row was measured again: a passing disturbance of the host",
                "REGRESSION": "REGRESSION"}[self.verdict]


# figure -> the same figure with the machine's limits divided out (measured around each row by the
# nightly job; a record without them is judged raw only)
NORMALIZED = {"token_throughput": "decode_efficiency", "prompt_flops": "prefill_efficiency"}


# a figure whose window runs at this share of its limits or more spends most of its time on them: a
# slower limit around its row explains it being slower (batch-1 decode with cpugen's gemv kernels runs
# at 72-97% of the read bandwidth, batch 4 at about 61%; a decode bound by widening bf16 or by
# PyTorch's GEMM runs far below it). CI once alarmed on batch 4 at 61%: -17.8% raw with the bandwidth
# read around it about 20% lower (efficiency +2.2%), through all three re-measures, when this was 70%.
NEAR_LIMIT = 0.50

# a row in which others (hypervisor steal, other processes) took more than this share of the CPUs'
# time beyond what they took in the history's runs: a slower figure there is the host's
HOST_BUSY = 0.05
BUSY = ("host_steal_share", "host_other_cpu_share")  # read around each row (host/contention.py)


def busy_share(d: dict) -> float | None:
    v = [d.get(k) for k in BUSY]
    return sum(v) if all(isinstance(x, (int, float)) for x in v) else None


def _measured_limits(d: dict) -> bool:
    return str(d.get("limits_source", "")).startswith("measured")


def compare(new: list[dict], past: list[dict], rule: Rule = Rule(), normalize: bool = True) -> list[Finding]:
    """One finding per tracked figure of each new record that ran and asks to be compared; `past` in
    file order (oldest first). `normalize=False` judges the raw figures alone (calibration's contrast)."""
    rule.check()
    by_key: dict[tuple, list[dict]] = {}
    for d in past:
        if not d.get("confirmation"):  # a night's re-measures never count as nights of their own
            by_key.setdefault(key(d), []).append(d)
    out = []
    for d in new:
        if d.get("status", "ok") != "ok" or d.get("compare") is False:
            continue
        for figure, sign in TRACKED.items():
            if not usable(d, figure) or (d.get("judge") and figure not in d["judge"]):
                continue  # a sweep may judge only some figures (nightly-short: not its tiny prefill)
            window = [p for p in by_key.get(key(d), []) if usable(p, figure)][-rule.window:]
            raw = norm = None
            if len(window) >= rule.min_runs:
                raw = judge(d[figure], [p[figure] for p in window], sign, rule)
                nf = NORMALIZED.get(figure)
                if normalize and nf and _measured_limits(d) and usable(d, nf):
                    nwin = [p[nf] for p in window if _measured_limits(p) and usable(p, nf)]
                    if len(nwin) >= rule.min_runs:
                        norm = judge(d[nf], nwin, sign, rule)
            busy = None
            past_busy = [b for b in map(busy_share, window) if b is not None]
            if busy_share(d) is not None and past_busy:  # without the counters on both sides: no witness
                busy = (busy_share(d), statistics.median(past_busy))
            out.append(Finding(d, figure, d[figure], raw, norm, len(window), rule, busy=busy))
    return out


UNITS = {"token_throughput": (1, "tok/s"), "prompt_flops": (1e12, "TFLOPS"), "peak_rss_bytes": (1024**3, "GiB"),
         "decode_efficiency": (0.01, "% of the limits"), "prefill_efficiency": (0.01, "% of the limits")}


def fmt_figure(figure: str, v: float | None) -> str:
    if v is None:
        return "-"
    div, unit = UNITS.get(figure, (1, ""))
    return f"{v / div:.4g} {unit}".strip()


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def report_lines(findings: list[Finding]) -> list[str]:
    """One readable line per finding, regressions first, then the host's slow nights."""
    order = {"REGRESSION": 0, "transient": 1, "host": 2, "ok": 3, "learning": 4, "new": 5}
    lines = []
    for f in sorted(findings, key=lambda f: order[f.verdict]):
        fmt = lambda v, fig=f.figure: fmt_figure(fig, v)  # noqa: E731
        head = f"{f.verdict:<11} {f.figure:<16} {describe(f.record)}: "
        if f.verdict == "new":
            lines.append(head + f"{fmt(f.now)} (no history: recorded as the first point)")
        elif f.verdict == "learning":
            lines.append(head + f"{fmt(f.now)} ({f.note})")
        else:
            line = head + f.raw.text(fmt)
            if f.normalized is not None:
                line += (f"; against the limits measured around it ({NORMALIZED[f.figure]}): "
                         + f.normalized.text(_pct))
            if f.verdict == "host":
                line += f" - {f.note}"
            elif f.verdict != "ok" and f.normalized is not None and f.normalized.held:
                line += (f"; its limits do not excuse it: it runs at {f.normalized.median:.0%} of them (below "
                         f"{NEAR_LIMIT:.0%}) and divided by them its history is noisier")
            if f.verdict not in ("host", "ok") and f.busy is not None:
                line += f"; others took {f.busy[0]:.0%} of the CPUs' time during the row (its history: {f.busy[1]:.0%})"
            for i, r in enumerate(f.retries):
                line += (f"; measured again ({i + 1}): {fmt(r.now)} ({r.change:+.1%}): "
                         + ("worse again" if r.regressed else "not reproduced"))
            lines.append(line)
    return lines
