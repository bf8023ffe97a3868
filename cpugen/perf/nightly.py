"""The nightly performance job (scripts/nightly): run sweeps, keep their records, flag regressions.

    scripts/nightly --sweep FILE [--sweep FILE ...] --history PATH --report-dir DIR [--threshold 0.10] [--window N]

Each record is appended to the history (JSONL) as soon as its batch has run. When every sweep has
run, each record's token throughput, prompt FLOPS and peak RSS are compared with the median of the
last N runs of the same configuration on this machine (cpugen/history.py); the verdict, the sweeps'
tables and the charts go to DIR/report.md, the verdict and the comparison also to stdout.

Exit status: 0 nothing regressed, 1 a figure regressed beyond the threshold, 2 a usage or run error.
"""

from __future__ import annotations

import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from cpugen.perf import history
from cpugen.errors import CpugenError
from cpugen.perf.record import RunRecord, environment_line, sweep_markdown


def report(records: list[RunRecord], findings: list[history.Finding], args, past: history.History,
           charts: list, chart_note: str | None, error: str | None, seconds: float) -> tuple[str, str]:
    """(verdict, report.md)."""
    regressions = [f for f in findings if f.regressed]
    if error:
        verdict = f"RUN ERROR: {error}"
    elif regressions:
        verdict = f"REGRESSION: {len(regressions)} figure(s) beyond {args.threshold:.0%}"
    else:
        verdict = f"no regression beyond {args.threshold:.0%}"
    md = [f"# cpugen nightly, {datetime.now(timezone.utc).isoformat(timespec='seconds')}", "",
          f"**{verdict}**", ""]
    if records:
        md += [f"- {environment_line(records[0])}"]
    md += [f"- Sweeps: {', '.join(args.sweep)}; {len(records)} records in {seconds:.0f} s",
           f"- History: `{args.history}` ({len(past.records)} earlier records); each figure is compared with the "
           f"median of the last {args.window} runs of its configuration (same CPU, model, layers, backend, dtype, "
           f"setting, batch, threads and non-default CPUGEN_* knobs)", ""]
    md += ["## Comparison", "", "```", *(history.report_lines(findings, args.threshold) or ["(nothing ran)"]),
           "```", ""]
    if past.problems:
        md += ["## History problems", "", *(f"- {p}" for p in past.problems), ""]
    md += ["## Sweeps", "", sweep_markdown(records) if records else "(no records)", ""]
    md += ["## Charts", ""]
    if chart_note:
        md += [f"Charts skipped: {chart_note}. The tables above hold every figure.", ""]
    for c in charts:
        md += [f"![{c.title}]({c.path.name})", ""]
    return verdict, "\n".join(md)


def main(args) -> int:
    """The job, for options parsed by `cpugen nightly` (cli.py)."""
    from cpugen.perf import bench, charts

    t0 = time.perf_counter()
    try:
        history.compare([], [], args.threshold, args.window)  # checks both before anything runs
        sweeps = [bench.load_sweep(s) for s in args.sweep]
        hist_path, out_dir = Path(args.history), Path(args.report_dir)
        past = history.read(hist_path)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            hist_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CpugenError(f"cannot create {e.filename}: {e.strerror}") from None
    except CpugenError as e:
        print(f"cpugen: error: {e}", file=sys.stderr)
        return 2
    for p in past.problems:
        print(f"cpugen: warning: {p}", file=sys.stderr)

    records: list[RunRecord] = []

    def keep(r: RunRecord):
        history.append(hist_path, [r])
        records.append(r)

    error = None
    try:
        for sw in sweeps:
            bench.run_sweep(sw, quiet=args.quiet, on_record=keep)
    except CpugenError as e:
        error = str(e)
    except MemoryError:
        error = "out of memory"
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # noqa: BLE001 - a crash is a run error (2), never a regression (1)
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    new = [r.to_dict() for r in records]
    findings = history.compare(new, past.records, args.threshold, args.window)
    try:
        drawn, note = charts.write_all(out_dir, new, past.records + new)
    except Exception as e:  # noqa: BLE001 - a chart must never hide the verdict
        drawn, note = [], f"drawing failed ({type(e).__name__}: {e})"
    verdict, md = report(records, findings, args, past, drawn, note, error, time.perf_counter() - t0)
    try:
        (out_dir / "report.md").write_text(md + "\n")
    except OSError as e:
        print(f"cpugen: error: cannot write {out_dir / 'report.md'}: {e.strerror}", file=sys.stderr)
        return 2
    print(verdict)
    for line in history.report_lines([f for f in findings if f.regressed], args.threshold):
        print(line)
    fresh = sum(f.baseline is None for f in findings)
    print(f"{len(findings) - fresh} figures compared with history, {fresh} without history (new configurations)"
          f", {sum(f.regressed for f in findings)} regressed")
    print(f"report: {out_dir / 'report.md'}; history: {hist_path} ({len(records)} records appended)")
    if error:
        print(f"cpugen: error: {error}", file=sys.stderr)
        return 2
    return 1 if any(f.regressed for f in findings) else 0
