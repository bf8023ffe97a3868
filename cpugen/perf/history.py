"""The performance history: an append-only JSONL file of result records, and regressions against it.

Writing: each record is one line, written by a single write() on a file opened with O_APPEND, then
fsync'd, so a crash or a kill leaves every earlier line whole; at worst the last line is cut short.
A file that does not end in a newline (a write cut short) gets one before the next record, so the
fragment stays a line of its own and never swallows a good record.

Reading: a line that is not a JSON object with the grouping key's fields (a truncated or corrupt
line) is reported and skipped; every other line is kept.

Comparing: a record is compared with the median of the last `window` records of the same
configuration (KEY: same machine, model, backend, setting, batch, threads and knobs). Token throughput and
prompt FLOPS regress when they drop, peak memory when it grows, by more than `threshold`.
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
    return (*(d.get(k) for k in KEY), d.get(KNOBS_KEY) or "")


def describe(d: dict) -> str:
    """A configuration in a few words: 'gptj-1b/1L eager bfloat16 16+4 batch 2, 2 threads'."""
    where = f"{d.get('sweep')}/{d.get('setting')} " if d.get("setting") else ""
    knobs = f", {d[KNOBS_KEY]}" if d.get(KNOBS_KEY) else ""
    return (f"{where}{d['model']}/{d['n_layer']}L {d['backend']} {d['dtype']} {d['prompt_len']}+{d['gen_len']} "
            f"batch {d['batch_size']}, {d['threads']} threads{knobs}")


def usable(d: dict, figure: str) -> bool:
    v = d.get(figure)
    return d.get("status", "ok") == "ok" and isinstance(v, (int, float)) and v == v and v > 0


@dataclass
class Finding:
    record: dict
    figure: str
    now: float
    baseline: float | None  # median of the last runs, None without history
    runs: int  # how many runs the baseline is the median of
    change: float | None  # (now - baseline) / baseline
    regressed: bool

    @property
    def note(self) -> str:
        if self.baseline is None:
            return "new configuration: no history to compare with"
        return "REGRESSION" if self.regressed else "ok"


def compare(new: list[dict], past: list[dict], threshold: float = 0.10, window: int = 5) -> list[Finding]:
    """One finding per tracked figure of each new record that ran; `past` in file order (oldest first)."""
    if not 0 < threshold < 1:
        raise CpugenError(f"--threshold must be between 0 and 1 (0.10 is 10%), not {threshold}")
    if window < 1:
        raise CpugenError(f"--window must be at least 1, not {window}")
    by_key: dict[tuple, list[dict]] = {}
    for d in past:
        by_key.setdefault(key(d), []).append(d)
    out = []
    for d in new:
        if d.get("status", "ok") != "ok":
            continue
        for figure, sign in TRACKED.items():
            if not usable(d, figure):
                continue
            recent = [p[figure] for p in by_key.get(key(d), []) if usable(p, figure)][-window:]
            if not recent:
                out.append(Finding(d, figure, d[figure], None, 0, None, False))
                continue
            base = statistics.median(recent)
            change = (d[figure] - base) / base
            out.append(Finding(d, figure, d[figure], base, len(recent), change, sign * change < -threshold))
    return out


UNITS = {"token_throughput": (1, "tok/s"), "prompt_flops": (1e12, "TFLOPS"), "peak_rss_bytes": (1024**3, "GiB")}


def fmt_figure(figure: str, v: float | None) -> str:
    if v is None:
        return "-"
    div, unit = UNITS.get(figure, (1, ""))
    return f"{v / div:.4g} {unit}".strip()


def report_lines(findings: list[Finding], threshold: float) -> list[str]:
    """One readable line per finding, regressions first."""
    lines = []
    for f in sorted(findings, key=lambda f: (not f.regressed, f.baseline is None)):
        if f.baseline is None:
            lines.append(f"new         {f.figure:<16} {describe(f.record)}: {fmt_figure(f.figure, f.now)} "
                         "(no history: recorded as the first point)")
        else:
            word = "REGRESSION " if f.regressed else "ok         "
            lines.append(f"{word} {f.figure:<16} {describe(f.record)}: {fmt_figure(f.figure, f.now)} against "
                         f"the median {fmt_figure(f.figure, f.baseline)} of the last {f.runs} runs "
                         f"({f.change:+.1%}, threshold {threshold:.0%})")
    return lines
