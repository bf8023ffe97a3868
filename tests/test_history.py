"""The history file under crashes, and the regression detector against synthetic histories."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT

CONFIG = dict(cpu="Test CPU", model="gptj-1b", n_layer=1, backend="eager", dtype="bfloat16", prompt_len=32,
              gen_len=4, batch_size=4, threads=2, status="ok")


def rec(i=0, **kw):
    return {**CONFIG, "token_throughput": 100.0, "prompt_flops": 1e11, "peak_rss_bytes": 3 * 10**9,
            "date": f"2026-01-{i + 1:02d}T00:00:00+00:00", **kw}


def test_append_then_read_round_trips(tmp_path):
    from cpugen.perf import history

    path = tmp_path / "h.jsonl"
    assert history.read(path).records == []  # no file yet: an empty history
    history.append(path, [rec(0), rec(1)])
    history.append(path, [rec(2)])
    h = history.read(path)
    assert h.records == [rec(0), rec(1), rec(2)] and h.problems == []
    assert path.read_bytes().count(b"\n") == 3 and path.read_bytes().endswith(b"\n")


def test_a_truncated_last_line_is_reported_and_skipped_and_earlier_records_stay(tmp_path):
    from cpugen.perf import history

    path = tmp_path / "h.jsonl"
    history.append(path, [rec(0), rec(1)])
    whole = path.read_bytes()
    cut = (json.dumps(rec(2)) + "\n").encode()[:40]  # killed in the middle of writing the third
    path.write_bytes(whole + cut)
    h = history.read(path)
    assert h.records == [rec(0), rec(1)]
    assert len(h.problems) == 1 and "truncated" in h.problems[0].split("h.jsonl:3:")[1]
    # the next run appends after it: the fragment stays a line of its own, the new record whole
    history.append(path, [rec(3)])
    h = history.read(path)
    assert h.records == [rec(0), rec(1), rec(3)]
    assert len(h.problems) == 1 and "truncated" not in h.problems[0].split(":3:")[1]  # a fragment, mid-file now
    assert path.read_bytes().startswith(whole)  # earlier lines byte for byte as they were


def test_corrupt_lines_in_the_middle_are_skipped(tmp_path):
    from cpugen.perf import history

    path = tmp_path / "h.jsonl"
    history.append(path, [rec(0)])
    with open(path, "ab") as f:
        f.write(b"\x00\x00garbage\n[1, 2]\n" + json.dumps({"model": "x"}).encode() + b"\n")
    history.append(path, [rec(1)])
    h = history.read(path)
    assert h.records == [rec(0), rec(1)]
    assert len(h.problems) == 3
    assert "not valid JSON" in h.problems[0] and "not a JSON object" in h.problems[1]
    assert "missing cpu" in h.problems[2]


WRITER = """
import sys
from cpugen.perf import history
i = 0
while True:
    history.append(sys.argv[1], [{**%r, "token_throughput": float(i), "pad": "x" * 5000}])
    i += 1
    if i == 20:
        print("ready", flush=True)
"""


def test_a_writer_killed_mid_run_never_corrupts_earlier_lines(tmp_path):
    """SIGKILL a process appending as fast as it can: every line before the last is whole, in order."""
    from cpugen.perf import history

    path = tmp_path / "h.jsonl"
    p = subprocess.Popen([sys.executable, "-c", WRITER % (CONFIG,), str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    h = history.read(path)
    assert len(h.records) >= 20 and len(h.problems) <= 1
    assert [r["token_throughput"] for r in h.records] == [float(i) for i in range(len(h.records))]
    if h.problems:
        assert "(truncated" in h.problems[0]


# --- the regression detector ----------------------------------------------------------------------------
NOISE = [1.0, 1.04, 0.97, 1.02, 0.96, 1.03]  # +-4%: these machines are noisy


def past(n=6, **kw):
    return [rec(i, token_throughput=100.0 * NOISE[i % 6], prompt_flops=1e11 * NOISE[(i + 2) % 6],
                peak_rss_bytes=int(3e9 * NOISE[(i + 4) % 6]), **kw) for i in range(n)]


def by_figure(findings):
    return {f.figure: f for f in findings}


def test_a_20_percent_throughput_drop_regresses():
    from cpugen.perf import history

    base = 100.0 * sorted(NOISE[1:6])[2]  # median of the last five
    f = by_figure(history.compare([rec(9, token_throughput=0.8 * base)], past(), 0.10, 5))
    assert f["token_throughput"].regressed and f["token_throughput"].runs == 5
    assert f["token_throughput"].change == pytest.approx(-0.2)
    assert not f["prompt_flops"].regressed and not f["peak_rss_bytes"].regressed
    line = history.report_lines(list(f.values()), 0.10)[0]
    assert line.startswith("REGRESSION") and "token_throughput" in line and "-20.0%" in line
    assert "last 5 runs" in line and "threshold 10%" in line


def test_noise_within_the_threshold_passes():
    from cpugen.perf import history

    for factor in (0.92, 0.95, 1.0, 1.08, 1.5):  # up to 8% worse, or better by any amount
        new = rec(9, token_throughput=100.0 * factor, prompt_flops=1e11 * factor, peak_rss_bytes=int(3e9 / factor))
        assert not any(f.regressed for f in history.compare([new], past(), 0.10, 5)), factor


def test_prompt_flops_drop_and_memory_growth_regress_and_the_threshold_is_configurable():
    from cpugen.perf import history

    f = by_figure(history.compare([rec(9, prompt_flops=0.85e11, peak_rss_bytes=int(3.45e9))], past(), 0.10, 5))
    assert f["prompt_flops"].regressed and f["peak_rss_bytes"].regressed and not f["token_throughput"].regressed
    f = by_figure(history.compare([rec(9, prompt_flops=0.85e11, peak_rss_bytes=int(3.45e9))], past(), 0.20, 5))
    assert not any(x.regressed for x in f.values())


def test_a_new_configuration_passes_with_a_note():
    from cpugen.perf import history

    findings = history.compare([rec(9, batch_size=16, token_throughput=1.0)], past(), 0.10, 5)
    assert len(findings) == 3 and not any(f.regressed for f in findings)
    assert all(f.baseline is None and "new configuration" in f.note for f in findings)
    assert all("no history" in line for line in history.report_lines(findings, 0.10))


def test_only_the_same_machine_and_the_last_n_runs_count():
    from cpugen.perf import history

    old_fast = [rec(i, token_throughput=1000.0) for i in range(10)]  # long ago, on a faster build
    other_cpu = [rec(i, cpu="Other CPU", token_throughput=1000.0) for i in range(10)]
    recent = past(3)
    f = by_figure(history.compare([rec(20, token_throughput=95.0)], old_fast + other_cpu + recent, 0.10, 3))
    assert not f["token_throughput"].regressed and f["token_throughput"].runs == 3
    f = by_figure(history.compare([rec(20, token_throughput=95.0)], old_fast + recent, 0.10, 7))
    assert f["token_throughput"].regressed  # a window of 7 reaches back into the fast runs


def test_rows_that_did_not_run_are_neither_compared_nor_baselines():
    from cpugen.perf import history

    nofit = rec(5, status="does not fit (needs 30.00 GiB, budget 20.00 GiB)", token_throughput=None,
                prompt_flops=None, peak_rss_bytes=None)
    assert history.compare([nofit], past(), 0.10, 5) == []
    f = by_figure(history.compare([rec(9)], [nofit], 0.10, 5))
    assert f["token_throughput"].baseline is None


@pytest.mark.parametrize("threshold, window, fragment", [(0, 5, "--threshold"), (1.5, 5, "--threshold"),
                                                         (0.1, 0, "--window")])
def test_bad_threshold_or_window(threshold, window, fragment):
    from cpugen.perf import history
    from cpugen.errors import CpugenError

    with pytest.raises(CpugenError, match=fragment):
        history.compare([], [], threshold, window)
