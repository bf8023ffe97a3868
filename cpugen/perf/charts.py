"""PNG charts for the nightly report: token throughput against batch size for each setting, and each
tracked figure over time. matplotlib is optional (`pip install 'cpugen[charts]'`): without it the
report says so and carries its numbers as text.

Each chart's series are read back from the lines drawn on the figure and written beside the PNG as
<name>.series.json ({label: [[x, y], ...]}), so what a chart shows can be checked without looking.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cpugen.perf.history import NORMALIZED, TRACKED, UNITS, describe, key, usable


@dataclass
class Chart:
    path: Path
    title: str
    series: dict  # label -> [(x, y), ...] as drawn


def missing() -> str | None:
    """Why charts cannot be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'cpugen[charts]')"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "chart"


def _x(v):
    return v.isoformat() if isinstance(v, datetime) else v.item() if hasattr(v, "item") else v


def _save(fig, ax, path: Path, title: str) -> Chart:
    series = {line.get_label(): [(_x(x), float(y)) for x, y in zip(line.get_xdata(orig=True), line.get_ydata())]
              for line in ax.get_lines()}
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    path.with_suffix(".series.json").write_text(json.dumps(series, indent=1) + "\n")
    return Chart(path, title, series)


def throughput_vs_batch(records: list[dict], path: Path, title: str) -> Chart:
    """A line per setting: token throughput (tok/s) at each batch size that ran."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    settings: dict[str, dict[int, float]] = {}
    for d in records:
        if usable(d, "token_throughput"):
            label = d.get("setting") or f"{d['prompt_len']}+{d['gen_len']}"
            settings.setdefault(label, {})[d["batch_size"]] = d["token_throughput"]
    for label, points in settings.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("token throughput (tok/s)")
    return _save(fig, ax, path, title)


def over_time(history: list[dict], figure: str, keys: set, path: Path) -> Chart:
    """A line per configuration in `keys`: the figure at each run's date, oldest first."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    div, unit = UNITS[figure]
    lines: dict[tuple, list] = {}
    for d in history:
        k = key(d)
        if k in keys and usable(d, figure) and d.get("date"):
            try:
                when = datetime.fromisoformat(d["date"])
            except ValueError:
                continue
            lines.setdefault(k, []).append((when, d[figure] / div, d))
    for k, pts in lines.items():
        pts.sort(key=lambda p: p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=describe(pts[-1][2]))
    ax.set_xlabel("run date (UTC)")
    ax.set_ylabel(f"{figure} ({unit})")
    fig.autofmt_xdate()
    return _save(fig, ax, path, f"{figure} over time")


def write_all(out_dir: Path, new: list[dict], history: list[dict]) -> tuple[list[Chart], str | None]:
    """The report's charts for this run's records (`new`) against the whole history (which includes
    them); (charts, why none) where matplotlib is missing."""
    why = missing()
    if why:
        return [], why
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = []
    sweeps: dict[str, list[dict]] = {}
    for d in new:
        sweeps.setdefault(d.get("sweep") or d["model"], []).append(d)
    for name, recs in sweeps.items():
        r = recs[0]
        title = f"{name}: {r['model']}, {r['n_layer']} layers, {r['backend']}, {r['threads']} threads"
        charts.append(throughput_vs_batch(recs, out_dir / f"throughput-vs-batch-{_slug(name)}.png", title))
    keys = {key(d) for d in new if d.get("status", "ok") == "ok"}
    # the raw figures, and the normalized ones beside them where the limits were measured around the rows
    normalized = [f for f in NORMALIZED.values() if any(usable(d, f) and str(d.get("limits_source", "")).startswith(
        "measured") for d in new)]
    for figure in (*TRACKED, *normalized):
        charts.append(over_time(history, figure, keys, out_dir / f"history-{figure}.png"))
    return charts, None
