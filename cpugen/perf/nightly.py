"""The nightly performance job (scripts/nightly): run sweeps, keep their records, flag regressions.

    scripts/nightly --sweep FILE [--sweep FILE ...] --history PATH --report-dir DIR [--repeat R]
                    [--threshold 0.10] [--spread-k 3] [--window 10] [--min-runs 5] [--calibrate N]

Every row of a compared sweep runs R >= 3 times (the record keeps each repeat), between two short
readings of the machine's limits (bandwidth and matmul rate), and is appended to the history
(JSONL) as soon as it has run. When every sweep has run, each record's token throughput, prompt
FLOPS and peak RSS are judged against the spread of the same configuration's history, raw and with
the limits divided out (history.Rule); the verdict, the sweeps' tables and the charts go to
DIR/report.md, the verdict and the comparison also to stdout. A sweep marked `"compare": false`
(the smoke sweep) checks the pipeline: its records are kept, never judged.

`--calibrate N` runs the sweeps N times on unchanged code and reports how often the rule (and, for
contrast, a fixed threshold alone) would have alarmed, with each figure's spread.

Exit status: 0 nothing regressed, 1 a figure regressed (with --calibrate: a false alarm), 2 a usage
or run error.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
import traceback
from datetime import datetime, timezone
from pathlib import Path

from cpugen.perf import history
from cpugen.errors import CpugenError
from cpugen.perf.record import RunRecord, environment_line, sweep_markdown


MIN_REPEAT = 3  # a compared row's repeats: below three there is no median that one bad repeat cannot move


def report(records: list[RunRecord], findings: list[history.Finding], args, rule: history.Rule,
           past: history.History, sweeps: list, charts: list, chart_note: str | None, error: str | None,
           seconds: float) -> tuple[str, str]:
    """(verdict, report.md)."""
    regressions = [f for f in findings if f.regressed]
    host = [f for f in findings if f.verdict == "host"]
    if error:
        verdict = f"RUN ERROR: {error}"
    elif regressions:
        verdict = f"REGRESSION: {len(regressions)} figure(s) worse beyond the threshold and the history's spread"
    else:
        verdict = "no regression" + (f" ({len(host)} figure(s) slower with the host, steady against its limits)"
                                     if host else "")
    md = [f"# cpugen nightly, {datetime.now(timezone.utc).isoformat(timespec='seconds')}", "",
          f"**{verdict}**", ""]
    if records:
        md += [f"- {environment_line(records[0])}"]
    unjudged = [sw.name for sw in sweeps if not sw.compare]
    md += [f"- Sweeps: {', '.join(args.sweep)}; {len(records)} records in {seconds:.0f} s",
           f"- History: `{args.history}` ({len(past.records)} earlier records). A figure regresses when it is "
           f"{rule.describe()}, and, for throughput and prompt FLOPS, when it is also worse against the machine's "
           "limits read right before and after its row (a raw figure worse with the normalized one steady is the "
           "host). Configurations: same CPU, model, layers, backend, dtype, setting, batch, threads and non-default "
           f"CPUGEN_* knobs. A regression is measured again (up to {args.confirm} times); one that a re-measure "
           "does not reproduce is reported as transient."]
    if unjudged:
        md += [f"- Not judged (pipeline checks, `\"compare\": false`): {', '.join(unjudged)}; their records are kept "
               "in the history"]
    md += ["", "## Comparison", "", "```", *(history.report_lines(findings) or ["(nothing compared)"]), "```", ""]
    if past.problems:
        md += ["## History problems", "", *(f"- {p}" for p in past.problems), ""]
    md += ["## Sweeps", "", sweep_markdown(records) if records else "(no records)", ""]
    md += ["## Charts", ""]
    if chart_note:
        md += [f"Charts skipped: {chart_note}. The tables above hold every figure.", ""]
    for c in charts:
        md += [f"![{c.title}]({c.path.name})", ""]
    return verdict, "\n".join(md)


def _setup(args):
    """The rule, the sweeps (compared ones at least MIN_REPEAT repeats), the history and the
    report's folder, all checked before anything runs."""
    from cpugen.perf import bench

    rule = history.Rule(args.threshold, args.spread_k, args.window, args.min_runs)
    rule.check()
    if args.repeat is not None and args.repeat < MIN_REPEAT:
        raise CpugenError(f"--repeat must be at least {MIN_REPEAT}, not {args.repeat}: the figures are medians over "
                          "repeats, and a median of fewer moves with one bad repeat")
    if args.confirm < 0:
        raise CpugenError(f"--confirm must be 0 or more, not {args.confirm}")
    if not 0 <= args.confirm_pause <= 3600:
        raise CpugenError(f"--confirm-pause must be from 0 to 3600 seconds, not {args.confirm_pause}")
    if args.calibrate is not None and args.calibrate < 2:
        raise CpugenError(f"--calibrate needs at least 2 runs, not {args.calibrate}")
    sweeps = [bench.load_sweep(s) for s in args.sweep]
    for sw in sweeps:
        if sw.compare:
            sw.repeat = args.repeat or max(sw.repeat, MIN_REPEAT)
    hist_path, out_dir = Path(args.history), Path(args.report_dir)
    past = history.read(hist_path)
    try:
        if _lead():
            out_dir.mkdir(parents=True, exist_ok=True)
            hist_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CpugenError(f"cannot create {e.filename}: {e.strerror}") from None
    return rule, sweeps, hist_path, out_dir, past


def _group():
    """The tensor-parallel group this job runs in (`nightly --tp N`), or None."""
    d = sys.modules.get("cpugen.runtime.distributed")
    return getattr(d, "current", None)


def _lead() -> bool:
    """Rank 0 (or the only process): the one that writes the history, the report and the verdict;
    the other ranks run the same sweeps beside it, in step."""
    g = _group()
    return g is None or g.rank == 0


def _same(obj):
    """Rank 0's decision on every rank (which rows to measure again), so that every rank runs them."""
    g = _group()
    if g is None:
        return obj
    from cpugen.runtime import distributed

    return distributed.same(g, obj)


def _run_sweeps(sweeps, hist_path: Path, quiet: bool, mark: dict | None = None) -> tuple[list[RunRecord], str | None]:
    """Runs every sweep, appending each record to the history as it finishes; (records, run error)."""
    from cpugen.perf import bench

    records: list[RunRecord] = []
    error = None
    try:
        for sw in sweeps:
            def keep(r: RunRecord, sw=sw):
                if not sw.compare:
                    r.extra["compare"] = False
                judge = next((st.judge for st in sw.settings if st.name == r.setting and st.judge), sw.judge)
                if judge:
                    r.extra["judge"] = list(judge)
                r.extra.update(mark or {})
                if _lead():
                    history.append(hist_path, [r])
                records.append(r)

            bench.run_sweep(sw, quiet=quiet, on_record=keep, limits=sw.compare)
    except CpugenError as e:
        error = str(e)
    except MemoryError:
        error = "out of memory"
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as e:  # noqa: BLE001 - a crash is a run error (2), never a regression (1)
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    return records, error


def main(args) -> int:
    """The job, for options parsed by `cpugen nightly` (cli.py)."""
    t0 = time.perf_counter()
    try:
        rule, sweeps, hist_path, out_dir, past = _setup(args)
    except CpugenError as e:
        print(f"cpugen: error: {e}", file=sys.stderr)
        return 2
    for p in past.problems:
        print(f"cpugen: warning: {p}", file=sys.stderr)
    if args.calibrate:
        return calibrate(args, rule, sweeps, hist_path, out_dir, past)

    records, error = _run_sweeps(sweeps, hist_path, args.quiet)
    new = [r.to_dict() for r in records]
    findings = history.compare(new, past.records, rule)
    if not error:
        error = confirm(findings, sweeps, past, rule, hist_path, args)
    if not _lead():  # rank 0 judges, writes and answers for the job
        return _same(None)
    return _same(_verdict(args, rule, sweeps, hist_path, out_dir, past, records, new, findings, error, t0))


def _verdict(args, rule, sweeps, hist_path, out_dir, past, records, new, findings, error, t0) -> int:
    """The report, the charts and the verdict: stdout's lines and the exit status."""
    from cpugen.perf import charts

    try:
        drawn, note = charts.write_all(out_dir, new, past.records + new)
    except Exception as e:  # noqa: BLE001 - a chart must never hide the verdict
        drawn, note = [], f"drawing failed ({type(e).__name__}: {e})"
    verdict, md = report(records, findings, args, rule, past, sweeps, drawn, note, error, time.perf_counter() - t0)
    try:
        (out_dir / "report.md").write_text(md + "\n")
    except OSError as e:
        print(f"cpugen: error: cannot write {out_dir / 'report.md'}: {e.strerror}", file=sys.stderr)
        return 2
    print(verdict)
    for line in history.report_lines([f for f in findings if f.verdict in ("REGRESSION", "transient", "host")]):
        print(line)
    n = {v: sum(f.verdict == v for f in findings)
         for v in ("REGRESSION", "transient", "host", "ok", "learning", "new")}
    print(f"{len(findings)} figures: {n['ok'] + n['host'] + n['transient'] + n['REGRESSION']} judged against their "
          f"history ({n['REGRESSION']} regressed, {n['transient']} not reproduced when measured again, {n['host']} "
          f"slower with the host), {n['learning']} with too little history "
          f"to judge, {n['new']} new configurations; not judged: "
          f"{', '.join(sw.name for sw in sweeps if not sw.compare) or 'none'}")
    print(f"report: {out_dir / 'report.md'}; history: {hist_path} ({len(records)} records appended)")
    if error:
        print(f"cpugen: error: {error}", file=sys.stderr)
        return 2
    return 1 if n["REGRESSION"] else 0


def confirm_pause(pause: float, attempt: int) -> float:
    """The wait before re-measure `attempt` (1, 2, ...): tripled each time (10, 30, 90 s by default), so
    that the re-measures span both the host's passing disturbances (seconds) and its slow regimes
    (a minute or more), while a regression of the code, which stays, costs a few minutes at most."""
    return pause * 3 ** (attempt - 1)


def confirm(findings: list[history.Finding], sweeps, past: history.History, rule: history.Rule, hist_path: Path,
            args) -> str | None:
    """Measures each row with a regressed figure again, up to args.confirm times, while it still looks
    regressed, and attaches the re-measures to the findings (a regression that one of them does not
    reproduce is "transient"). Returns a run error, if one happened."""
    for attempt in range(1, args.confirm + 1):
        suspects = [f for f in findings if f.verdict == "REGRESSION"]
        rows = _same({(f.record.get("sweep"), f.record.get("setting"), f.record["batch_size"]) for f in suspects})
        if not rows:
            return None
        again = [replace(sw, settings=[replace(st, batch_sizes=sorted(b for n, s_, b in rows if n == sw.name
                                                                      and s_ == st.name))
                                       for st in sw.settings if (sw.name, st.name) in {(n, s_) for n, s_, _ in rows}])
                 for sw in sweeps if sw.name in {n for n, _, _ in rows}]
        pause = confirm_pause(args.confirm_pause, attempt)
        if not args.quiet:
            print(f"cpugen: {len(suspects)} figure(s) look regressed: measuring {len(rows)} row(s) again in "
                  f"{pause:g} s ({attempt} of {args.confirm})", file=sys.stderr)
        time.sleep(pause)  # the host's disturbances come and go, some within seconds, some over a minute; the code's stay
        records, error = _run_sweeps(again, hist_path, args.quiet, {"confirmation": attempt})
        if error:
            return error
        retried = {(history.key(f.record), f.figure): f
                   for f in history.compare([r.to_dict() for r in records], past.records, rule)}
        for f in suspects:
            r = retried.get((history.key(f.record), f.figure))
            if r is not None:
                f.retries.append(r)
    return None


# --- calibration -------------------------------------------------------------------------------------------
def calibrate(args, rule: history.Rule, sweeps, hist_path: Path, out_dir: Path, past: history.History) -> int:
    """Runs args.calibrate nights on unchanged code, each the real job in a process of its own (a
    process that has run the sweep before is warmer than a night's fresh one), all into the one
    history (a calibration also seeds it). Each night judges itself, re-measures included; its exit
    status says whether it alarmed. Every alarm here is a false one. For contrast, the nights are
    judged again by a fixed threshold alone."""
    import subprocess

    fixed = history.Rule(rule.threshold, 0.0, rule.window, 1)
    cmd = [sys.executable, "-m", "cpugen", "nightly", *[a for sw in args.sweep for a in ("--sweep", sw)],
           "--history", str(hist_path), "--threshold", str(rule.threshold), "--spread-k", str(rule.k),
           "--window", str(rule.window), "--min-runs", str(rule.min_runs), "--confirm", str(args.confirm),
           "--confirm-pause", str(args.confirm_pause), "--quiet"] + (["--repeat", str(args.repeat)] if args.repeat else [])
    c = dict(alarms=0, judged=0, fixed=0, fixed_judged=0)
    false_alarms = []
    for i in range(args.calibrate):
        if not args.quiet:
            print(f"cpugen: calibration night {i + 1} of {args.calibrate}", file=sys.stderr)
        before = history.read(hist_path).records
        p = subprocess.run(cmd + ["--report-dir", str(out_dir / f"night-{i + 1}")], capture_output=True, text=True)
        if p.returncode not in (0, 1):
            print(f"cpugen: error: calibration night {i + 1}: {p.stderr.strip().splitlines()[-1:] or p.returncode}",
                  file=sys.stderr)
            return 2
        new = [d for d in history.read(hist_path).records[len(before):] if not d.get("confirmation")]
        judged = any(f.raw is not None for f in history.compare(new, before, rule))
        c["judged"] += judged
        if p.returncode == 1:
            c["alarms"] += 1
            false_alarms += [f"  night {i + 1}: false alarm: {line}" for line in p.stdout.splitlines()
                             if line.startswith("REGRESSION ")]
        theirs = history.compare(new, [d for d in before if not d.get("confirmation")], fixed, normalize=False)
        c["fixed_judged"] += any(f.raw is not None for f in theirs)
        c["fixed"] += any(f.regressed for f in theirs)
    records = [d for d in history.read(hist_path).records if not d.get("confirmation")]
    lines = [f"calibration: {args.calibrate} nights of {', '.join(sw.name for sw in sweeps)} on unchanged code, each "
             f"in its own process; rule: {rule.describe()}; a regression is measured again up to {args.confirm} "
             "times", *false_alarms,
             f"the rule alarmed on {c['alarms']} of {c['judged']} judged nights; a fixed {rule.threshold:.0%} threshold "
             f"against the median of the last {rule.window} runs would have alarmed on {c['fixed']} of "
             f"{c['fixed_judged']}", "",
             "spread over the calibration nights (MAD as a standard deviation, a share of the median; worst: "
             "the furthest night below the median):", *_spreads(records[len(past.records):])]
    text = "\n".join(lines)
    print(text)
    try:
        (out_dir / "calibration.md").write_text(f"# cpugen nightly calibration, "
                                                f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n\n"
                                                f"```\n{text}\n```\n")
    except OSError as e:
        print(f"cpugen: error: cannot write {out_dir / 'calibration.md'}: {e.strerror}", file=sys.stderr)
        return 2
    return 1 if c["alarms"] else 0


def _spreads(records: list[dict]) -> list[str]:
    by_key: dict[tuple, list[dict]] = {}
    for d in records:
        if d.get("status", "ok") == "ok" and d.get("compare") is not False:
            by_key.setdefault(history.key(d), []).append(d)
    out = []
    for recs in by_key.values():
        parts = []
        for figure, sign in history.TRACKED.items():
            for f in (figure, history.NORMALIZED.get(figure)):
                vals = [d[f] for d in recs if f and history.usable(d, f)]
                if len(vals) < 2:
                    continue
                j = history.judge(vals[0], vals, sign, history.Rule())
                worst = min(sign * (v - j.median) / j.median for v in vals)
                parts.append(f"{f} {j.sigma / j.median:.1%} (worst {worst:+.1%})")
        busy = [b for b in map(history.busy_share, recs) if b is not None]
        if busy:  # what the OS counted others as taking of the CPUs during the rows
            parts.append(f"others' share of the CPUs {statistics.median(busy):.1%} (most {max(busy):.1%})")
        out.append(f"  {history.describe(recs[0])}: " + ", ".join(parts))
    return out
