"""The history file under crashes, and the regression detector against synthetic histories."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
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


def past(n=10, noise=NOISE, **kw):
    return [rec(i, token_throughput=100.0 * noise[i % len(noise)], prompt_flops=1e11 * noise[(i + 2) % len(noise)],
                peak_rss_bytes=int(3e9 * noise[(i + 4) % len(noise)]), **kw) for i in range(n)]


def by_figure(findings):
    return {f.figure: f for f in findings}


def spread(values):
    """The window's spread as numpy computes it: MAD scaled to a normal standard deviation."""
    v = np.asarray(values, dtype=float)
    return 1.4826 * np.median(np.abs(v - np.median(v)))


def test_a_20_percent_throughput_drop_regresses():
    from cpugen.perf import history

    hist = past()
    base = np.median([r["token_throughput"] for r in hist])
    f = by_figure(history.compare([rec(19, token_throughput=0.8 * base)], hist))
    t = f["token_throughput"]
    assert t.regressed and t.runs == 10 and t.change == pytest.approx(-0.2)
    assert t.raw.sigma == pytest.approx(spread([r["token_throughput"] for r in hist]))
    assert not f["prompt_flops"].regressed and not f["peak_rss_bytes"].regressed
    line = history.report_lines(list(f.values()))[0]
    assert line.startswith("REGRESSION") and "token_throughput" in line and "-20.0%" in line
    assert "last 10 runs" in line and "10%" in line and "3 x spread" in line


def test_noise_within_the_threshold_passes():
    from cpugen.perf import history

    for factor in (0.92, 0.95, 1.0, 1.08, 1.5):  # up to 8% worse, or better by any amount
        new = rec(19, token_throughput=100.0 * factor, prompt_flops=1e11 * factor, peak_rss_bytes=int(3e9 / factor))
        assert not any(f.regressed for f in history.compare([new], past())), factor


def test_a_drop_within_a_noisy_historys_spread_is_not_a_regression():
    from cpugen.perf import history

    wide = [1.0, 1.15, 0.86, 1.1, 0.9, 1.2, 0.8, 1.05]  # a figure that swings +-20% run to run
    hist = past(noise=wide)
    values = [r["token_throughput"] for r in hist]
    med, sigma = np.median(values), spread(values)
    assert 3 * sigma / med > 0.25  # the bound is the spread's, far beyond the 10% threshold
    f = by_figure(history.compare([rec(19, token_throughput=0.8 * med)], hist))["token_throughput"]
    assert not f.regressed and f.verdict == "ok" and f.raw.bound == pytest.approx(3 * sigma / med)
    f = by_figure(history.compare([rec(19, token_throughput=med - 3.3 * sigma)], hist))["token_throughput"]
    assert f.regressed  # beyond three times the spread, it counts
    # and a steady history (no spread) still needs more than the threshold
    steady = [rec(i) for i in range(10)]
    assert not by_figure(history.compare([rec(19, token_throughput=91.0)], steady))["token_throughput"].regressed
    assert by_figure(history.compare([rec(19, token_throughput=89.0)], steady))["token_throughput"].regressed


def test_prompt_flops_drop_and_memory_growth_regress_and_the_threshold_is_configurable():
    from cpugen.perf import history

    f = by_figure(history.compare([rec(19, prompt_flops=0.85e11, peak_rss_bytes=int(3.45e9))], past()))
    assert f["prompt_flops"].regressed and f["peak_rss_bytes"].regressed and not f["token_throughput"].regressed
    f = by_figure(history.compare([rec(19, prompt_flops=0.85e11, peak_rss_bytes=int(3.45e9))], past(),
                                  history.Rule(threshold=0.20)))
    assert not any(x.regressed for x in f.values())


def test_a_new_configuration_passes_with_a_note():
    from cpugen.perf import history

    findings = history.compare([rec(19, batch_size=16, token_throughput=1.0)], past())
    assert len(findings) == 3 and not any(f.regressed for f in findings)
    assert all(f.baseline is None and "new configuration" in f.note for f in findings)
    assert all("no history" in line for line in history.report_lines(findings))


def test_too_little_history_is_not_judged():
    from cpugen.perf import history

    findings = history.compare([rec(19, token_throughput=1.0)], past(4))  # 99% slower, but 4 runs < 5
    assert {f.verdict for f in findings} == {"learning"} and not any(f.regressed for f in findings)
    assert "judged from 5" in history.report_lines(findings)[0]
    assert by_figure(history.compare([rec(19, token_throughput=1.0)], past(4), history.Rule(min_runs=4))
                     )["token_throughput"].regressed


def test_only_the_same_machine_and_the_last_n_runs_count():
    from cpugen.perf import history

    old_fast = [rec(i, token_throughput=1000.0) for i in range(10)]  # long ago, on a faster build
    other_cpu = [rec(i, cpu="Other CPU", token_throughput=1000.0) for i in range(10)]
    recent = past(5)
    f = by_figure(history.compare([rec(20, token_throughput=95.0)], old_fast + other_cpu + recent,
                                  history.Rule(window=5)))
    assert not f["token_throughput"].regressed and f["token_throughput"].runs == 5
    f = by_figure(history.compare([rec(20, token_throughput=95.0)], old_fast + recent, history.Rule(window=12)))
    assert f["token_throughput"].regressed  # a window of 12 reaches back into the fast runs


def test_rows_that_did_not_run_or_ask_not_to_be_compared_are_neither_compared_nor_baselines():
    from cpugen.perf import history

    nofit = rec(5, status="does not fit (needs 30.00 GiB, budget 20.00 GiB)", token_throughput=None,
                prompt_flops=None, peak_rss_bytes=None)
    assert history.compare([nofit], past()) == []
    assert history.compare([rec(19, token_throughput=1.0, compare=False)], past()) == []  # a smoke sweep's row
    f = by_figure(history.compare([rec(19)], [nofit] * 10))
    assert f["token_throughput"].baseline is None and f["token_throughput"].verdict == "new"


@pytest.mark.parametrize("rule, fragment", [(dict(threshold=0), "--threshold"), (dict(threshold=1.5), "--threshold"),
                                            (dict(window=0, min_runs=0), "--window"), (dict(k=-1), "--spread-k"),
                                            (dict(min_runs=11), "--min-runs")])
def test_bad_rule(rule, fragment):
    from cpugen.perf import history
    from cpugen.errors import CpugenError

    with pytest.raises(CpugenError, match=fragment):
        history.compare([], [], history.Rule(**rule))


# --- judged against the machine's limits ------------------------------------------------------------------
def regime(i, read_gbps, efficiency, **kw):
    """A batch-1 record whose decode moves with the bandwidth measured around it: throughput is
    efficiency x (bandwidth / bytes a token), as a bandwidth-bound decode's is."""
    tokens_per_gb = 2.0  # a 0.5 GB model
    return rec(i, token_throughput=efficiency * read_gbps * tokens_per_gb, decode_efficiency=efficiency,
               roofline_read_gbps=read_gbps, limits_source="measured around this row", **kw)


FAST, USUAL = 70.0, 45.0  # GB/s: this kind's two read-bandwidth regimes, about 1.5x apart


def test_a_slower_regime_with_steady_efficiency_is_the_host_not_a_regression():
    from cpugen.perf import history

    eff = [0.50, 0.51, 0.49, 0.505, 0.495]
    fast_nights = [regime(i, FAST * (1 + 0.01 * (i % 3)), eff[i % 5]) for i in range(10)]
    tonight = regime(20, USUAL, 0.50)  # raw -36%: the host fell into its usual regime
    f = by_figure(history.compare([tonight], fast_nights))["token_throughput"]
    assert f.raw.worse and f.raw.change < -0.3
    assert f.verdict == "host" and not f.regressed
    line = history.report_lines([f])[0]
    assert line.startswith("host") and "decode_efficiency" in line and "the host was slower, not the code" in line
    # a mixed history (both regimes) and a night in either: nothing alarms while the efficiency holds
    mixed = [regime(i, FAST if i % 3 else USUAL, eff[i % 5]) for i in range(12)]
    for bw in (FAST, USUAL):
        assert not any(x.regressed for x in history.compare([regime(30, bw, 0.497)], mixed))


def test_a_code_regression_shows_in_both_raw_and_normalized_figures():
    from cpugen.perf import history

    eff = [0.50, 0.51, 0.49, 0.505, 0.495]
    nights = [regime(i, FAST if i % 3 else USUAL, eff[i % 5]) for i in range(12)]
    slow_code = regime(30, USUAL, 0.40)  # 20% less efficient, in the slower regime
    f = by_figure(history.compare([slow_code], nights))["token_throughput"]
    assert f.regressed and f.normalized.worse and f.normalized.change == pytest.approx(0.40 / np.median(
        [n["decode_efficiency"] for n in nights[-10:]]) - 1)
    # without the limits (records of `cpugen bench`, cached limits) the raw figure alone decides
    raw_only = [{k: v for k, v in n.items() if k != "limits_source"} for n in nights]
    assert by_figure(history.compare([raw_only[-1] | {"token_throughput": 1.0}], raw_only)
                     )["token_throughput"].normalized is None


def test_a_regression_that_a_re_measure_does_not_reproduce_is_transient():
    from cpugen.perf import history

    hist = past()
    (first,) = [f for f in history.compare([rec(19, prompt_flops=0.7e11)], hist) if f.figure == "prompt_flops"]
    assert first.regressed
    (again,) = [f for f in history.compare([rec(19, prompt_flops=1.01e11, confirmation=1)], hist)
                if f.figure == "prompt_flops"]
    first.retries.append(again)
    assert first.verdict == "transient" and not first.regressed
    line = history.report_lines([first])[0]
    assert line.startswith("transient") and "measured again (1)" in line and "not reproduced" in line
    # reproduced every time: a regression; and re-measures never count as nights of their own
    (still,) = [f for f in history.compare([rec(19, prompt_flops=0.7e11)], hist) if f.figure == "prompt_flops"]
    still.retries += [first, first]  # both re-measures worse too (first, before its retry, regressed)
    first.retries.clear()
    assert still.regressed and "worse again" in history.report_lines([still])[0]
    remeasures = [rec(20 + i, prompt_flops=0.5e11, confirmation=1) for i in range(10)]
    f = by_figure(history.compare([rec(40)], hist + remeasures))["prompt_flops"]
    assert f.runs == 10 and not f.regressed and f.raw.median == pytest.approx(np.median([r["prompt_flops"] for r in hist]))


def test_a_drop_inside_the_raw_noise_but_beyond_the_steadier_normalized_noise_regresses():
    """A decode that follows the bandwidth regimes: raw it swings (here +-7%), against the bandwidth
    measured around it it holds (+-1.5%). A real 15% drop is inside the raw spread's 3 sigma but far
    outside the normalized one's: a regression; the same raw drop with steady efficiency is the host."""
    from cpugen.perf import history

    eff = [0.72, 0.73, 0.71, 0.725, 0.715]
    bws = [44.0, 47.0, 41.0, 45.0, 40.0, 48.0, 43.0]
    nights = [regime(i, bws[i % 7], eff[i % 5]) for i in range(12)]
    raw = history.judge(1.0, [n["token_throughput"] for n in nights[-10:]], +1, history.Rule())
    slow = regime(30, 44.0, 0.72 * 0.82)  # the code 18% slower, the bandwidth at its usual
    f = by_figure(history.compare([slow], nights))["token_throughput"]
    assert not f.raw.worse and not f.raw.held and 3 * raw.spread > abs(f.raw.change)  # inside the raw noise
    assert f.normalized.worse and f.regressed
    host = regime(30, 30.0, 0.72)  # raw far lower, efficiency steady: the host
    assert by_figure(history.compare([host], nights))["token_throughput"].verdict == "host"


def test_a_figure_near_its_limit_follows_it_even_where_dividing_adds_a_little_noise():
    """CI's case: batch-1 decode at 87% of the read bandwidth, 5.2% spread raw and 5.8% divided by the
    bandwidth (two 10-run spreads, each uncertain by about a third); the host's bandwidth fell 26% for
    minutes and the decode with it. Near its limit the limit bounds it: the host. Far below its limit
    (a decode bound by something else), the same numbers leave the raw figure to decide."""
    from cpugen.perf import history

    def nights(level):
        eff = [level * x for x in (1.0, 1.06, 0.94, 1.03, 0.97, 1.05, 0.95, 1.01, 0.99, 1.0)]
        bws = [33.0 * x for x in (1.0, 0.97, 1.03, 1.0, 1.02, 0.98, 1.0, 0.99, 1.01, 1.0)]
        return [regime(i, bws[i], eff[i]) for i in range(10)]

    for level, verdict in ((0.87, "host"), (0.61, "host"), (0.40, "REGRESSION")):  # 0.61: CI's batch 4
        hist = nights(level)
        tonight = regime(20, 33.0 * 0.74, level)  # the bandwidth 26% lower, the efficiency at its median
        f = by_figure(history.compare([tonight], hist))["token_throughput"]
        assert f.raw.worse and f.normalized.held and f.normalized.spread > f.raw.spread  # dividing: noisier
        assert f.verdict == verdict, (level, f.raw.spread, f.normalized.spread)
        line = history.report_lines([f])[0]
        if verdict == "REGRESSION":
            assert "its limits do not excuse it: it runs at 40% of them (below 50%)" in line
        else:
            assert "the host was slower, not the code" in line
        # the code slower at the same level of bandwidth: a regression near the limit too
        slow = regime(21, 33.0, level * 0.75)
        assert by_figure(history.compare([slow], hist))["token_throughput"].regressed


def test_a_drop_while_others_had_the_cpus_is_the_host_and_a_quiet_one_is_not():
    """The operating system's count of the CPUs' time others took during the row (hypervisor steal,
    other processes: host/contention.py) is a witness of its own: a row slowed while others had a
    share beyond what they had in the history is the host's; the same drop on a quiet row regresses."""
    from cpugen.perf import history

    quiet = dict(host_steal_share=0.01, host_other_cpu_share=0.02)
    hist = past(**quiet)
    base = np.median([r["token_throughput"] for r in hist])
    busy = by_figure(history.compare([rec(19, token_throughput=0.8 * base, host_steal_share=0.09,
                                          host_other_cpu_share=0.03)], hist))["token_throughput"]
    assert busy.busy == pytest.approx((0.12, 0.03)) and busy.verdict == "host" and not busy.regressed
    line = history.report_lines([busy])[0]
    assert line.startswith("host") and "the OS counted 12% of the CPUs' time" in line and "median: 3%" in line
    calm = by_figure(history.compare([rec(19, token_throughput=0.8 * base, **quiet)], hist))["token_throughput"]
    assert calm.regressed and "others took 3% of the CPUs' time" in history.report_lines([calm])[0]
    # a host that is always this busy excuses nothing: only a share beyond the history's counts
    always = past(host_steal_share=0.10, host_other_cpu_share=0.02)
    f = by_figure(history.compare([rec(19, token_throughput=0.8 * base, host_steal_share=0.10,
                                       host_other_cpu_share=0.04)], always))["token_throughput"]
    assert f.regressed
    # records from before the counters, tonight's or the history's: no witness, the rule as before
    assert by_figure(history.compare([rec(19, token_throughput=0.8 * base)], hist))["token_throughput"].busy is None
    f = by_figure(history.compare([rec(19, token_throughput=0.8 * base, host_steal_share=0.2, host_other_cpu_share=0.1)],
                                  past()))["token_throughput"]
    assert f.busy is None and f.regressed


def test_the_contention_witness_counts_other_processes_and_not_this_one():
    """Against the OS's own accounting: a process spinning beside an idle one is counted as others'
    time (about one CPU of those this process may use); this process spinning is not."""
    from cpugen.host import contention

    cpus = len(os.sched_getaffinity(0))
    with contention.Watch() as w:
        spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.5: pass"])
        spin.wait()
    assert w.result["host_other_cpu_share"] > 0.5 / cpus, w.result  # one CPU of `cpus`, less start-up
    assert 0 <= w.result["host_steal_share"] < 0.5
    with contention.Watch() as w:
        t = time.time()
        while time.time() - t < 1.5:
            pass
    assert w.result["host_other_cpu_share"] < 0.25 / cpus, w.result
    assert abs(w.result["host_share_span_s"] - 1.5) < 0.3, w.result  # the span as the OS's ticks count it
    with contention.Watch() as w:  # too short to tell: a tick is 10 ms
        time.sleep(0.1)
    assert w.result["host_steal_share"] is None and w.result["host_other_cpu_share"] is None
    assert w.result["host_share_span_s"] < contention.MIN_SPAN_S
