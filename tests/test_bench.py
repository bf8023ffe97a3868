"""Batch sweeps (`cpugen bench`) and the one record type behind every view of them."""

import csv
import io
import json
import statistics

import pytest

from cpugen import knobs

from helpers import ROOT, assert_one_line_error, cli, fake_roofline
from test_cli import RUN_KEYS

ENV = {"commit", "avx512_bf16", "amx_bf16", "cores", "threads", "memory_bytes", "torch_version", "ipex_version",
       "cpu"}
SWEEP_KEYS = {"status", "sweep", "setting", "date", "repeats", "n_layer", "dtype", "token_throughput_min",
              "token_throughput_max", "prompt_flops_min", "prompt_flops_max", "decode_efficiency",
              "prefill_efficiency", "repeat_prompt_time_s", "repeat_decode_time_per_token_s", "batch_request"}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One CLI sweep, reused: two settings, explicit, auto and impossible batches, three repeats."""
    d = tmp_path_factory.mktemp("bench")
    out = d / "rows.jsonl"
    p = cli("bench", "--model", "tiny-gptj", "--prompt-len", "16,8", "--gen-len", "5", "--batch-sizes",
            "1,3,auto,100000000", "--max-batch-size", "4", "--repeat", "3", "--warmup", "1", "--backend", "eager",
            "--memory-budget", "4GiB", "--format", "jsonl", "--out", out, env=fake_roofline(d / "cache"))
    assert p.returncode == 0, p.stderr
    return p, [json.loads(line) for line in out.read_text().splitlines()]


def test_sweep_rows_carry_the_figures_their_spread_and_environment(swept):
    p, rows = swept
    assert [(r["setting"], r["batch_size"], r["status"]) for r in rows] == [
        ("16+5", 1, "ok"), ("16+5", 3, "ok"), ("16+5", 4, "ok"), ("16+5", 100000000, rows[3]["status"]),
        ("8+5", 1, "ok"), ("8+5", 3, "ok"), ("8+5", 4, "ok"), ("8+5", 100000000, rows[7]["status"])]
    assert rows[2]["batch_request"] == "auto"  # auto resolved by the planner, capped by --max-batch-size
    for r in rows:
        assert ENV <= r.keys() and r["date"] and r["model"] == "tiny-gptj" and r["n_params"] > 0
    for r in (r for r in rows if r["status"] == "ok"):
        assert (RUN_KEYS | SWEEP_KEYS) <= r.keys()
        assert r["repeats"] == 3 and r["decode_steps"] == 4
        prompt_times, step_means = r["repeat_prompt_time_s"], r["repeat_decode_time_per_token_s"]
        assert len(prompt_times) == len(step_means) == 3
        # each figure is the median over repeats, with min and max beside it
        assert r["prompt_time_s"] == pytest.approx(statistics.median(prompt_times))
        assert r["decode_time_per_token_s"] == pytest.approx(statistics.median(step_means))
        assert r["token_throughput"] == pytest.approx(r["batch_size"] / r["decode_time_per_token_s"])
        assert r["token_throughput_min"] == pytest.approx(r["batch_size"] / max(step_means))
        assert r["token_throughput_max"] == pytest.approx(r["batch_size"] / min(step_means))
        assert r["token_throughput_min"] <= r["token_throughput"] <= r["token_throughput_max"]
        assert r["prompt_flops_min"] <= r["prompt_flops"] <= r["prompt_flops_max"]
        assert r["decode_efficiency"] > 0 and r["roofline_read_gbps"] == 20.0  # the fixed limits, not measured
        assert r["peak_rss_bytes"] > r["weight_bytes"] and r["peak_rss_since"] == "batch start"


def test_a_batch_that_cannot_fit_is_a_row_not_a_crash(swept):
    p, rows = swept
    big = rows[3]
    assert big["status"].startswith("does not fit (needs ") and big["status"].endswith(" GiB, budget 4.00 GiB)")
    needs = float(big["status"].split("needs ")[1].split(" GiB")[0])
    assert needs == pytest.approx(big["needed_bytes"] / 1024**3, abs=0.01) and needs > 4
    for k in ("prompt_time_s", "token_throughput", "peak_rss_bytes", "decode_time_per_token_s"):
        assert big[k] is None  # not measured: null, never a made-up number
    assert big["repeats"] == 0 and big["kv_cache_bytes"] > 4 * 1024**3
    assert "batch 100000000: does not fit" in p.stderr  # said as it happens, on stderr


def _fixed_limits(monkeypatch, tmp_path):
    """This process compares with fixed limits (helpers.fake_roofline) and runs no native kernel."""
    from cpugen.perf import roofline

    for k, v in fake_roofline(tmp_path).items():
        monkeypatch.setenv(k, v)
    knobs.reload()
    monkeypatch.setattr(roofline, "cache_file", lambda: tmp_path / "roofline.json")


def test_the_model_loads_once_per_sweep(monkeypatch, tmp_path):
    from cpugen.perf import bench

    _fixed_limits(monkeypatch, tmp_path)
    from cpugen.runtime.session import Session

    loads = []
    real = Session.load
    monkeypatch.setattr(Session, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    sweep = bench.from_dict({"name": "t", "model": "tiny-gptj", "backend": "eager", "repeat": 2, "settings": [
        {"prompt_len": 8, "gen_len": 3, "batch_sizes": [1, 2]}, {"prompt_len": 4, "gen_len": 2, "batch_sizes": [2]}]})
    seen = []
    recs = bench.run_sweep(sweep, quiet=True, on_record=seen.append)
    assert len(loads) == 1 and seen == recs
    assert [(r.setting, r.batch_size, r.repeats) for r in recs] == [("8+3", 1, 2), ("8+3", 2, 2), ("4+2", 2, 2)]


def _record(**kw):
    from cpugen.perf.record import RunRecord

    base = dict(model="gptj-1b", backend="eager", dtype="bfloat16", batch_size=4, prompt_len=32, gen_len=4, n_layer=1,
                n_params=10**9, weight_bytes=2 * 10**9, kv_cache_bytes=10**6, prompt_time_s=0.5, prompt_flops=1e11,
                prompt_flop_per_seq=1e10, decode_time_per_token_s=0.1, decode_time_median_s=0.1,
                decode_time_min_s=0.09, decode_time_max_s=0.12, decode_steps=3, token_throughput=40.0,
                token_flops=8e10, token_flop_per_seq=2e9, decode_weight_gbps=20.0, peak_rss_bytes=3 * 10**9,
                threads=2, torch_version="2.13.0+cpu", cpu="Test CPU", status="ok", sweep="s", setting="a",
                date="2026-01-02T03:04:05+00:00", repeats=3, token_throughput_min=38.0, token_throughput_max=41.0,
                prompt_flops_min=0.9e11, prompt_flops_max=1.1e11,
                env={"cpu": "Test CPU", "avx512_bf16": True, "amx_bf16": False, "cores": 2, "threads": 2,
                     "memory_bytes": 24 * 1024**3, "torch_version": "2.13.0+cpu", "ipex_version": None,
                     "commit": "abc1234"},
                extra={"repeat_prompt_time_s": [0.5, 0.45, 0.55], "batch_request": "auto"})
    return RunRecord(**{**base, **kw})


def test_record_schema_round_trips_and_every_view_shows_the_same_record():
    from cpugen.host.environment import environment
    from cpugen.perf.record import ENV_KEYS, RunRecord, csv_text, jsonl, markdown, sweep_markdown

    ok = _record()
    nofit = _record(batch_size=64, status="does not fit (needs 30.00 GiB, budget 20.00 GiB)", prompt_time_s=None,
                    prompt_flops=None, token_throughput=None, peak_rss_bytes=None, repeats=0, extra={})
    # every key environment() writes is either a field or restored into env by from_dict
    assert set(environment(1)) <= set(ENV_KEYS)
    for r in (ok, nofit):
        d = r.to_dict()
        assert RUN_KEYS <= d.keys() and ENV <= d.keys()
        back = RunRecord.from_dict(json.loads(r.to_json()))
        assert back == r and back.to_dict() == d
    lines = jsonl([ok, nofit]).splitlines()
    assert [json.loads(x) for x in lines] == [ok.to_dict(), nofit.to_dict()]
    rows = list(csv.DictReader(io.StringIO(csv_text([ok, nofit]))))
    assert rows[0]["token_throughput"] == "40.0" and rows[0]["commit"] == "abc1234"
    assert json.loads(rows[0]["repeat_prompt_time_s"]) == [0.5, 0.45, 0.55]
    assert rows[1]["token_throughput"] == "" and rows[1]["status"].startswith("does not fit")
    table = markdown([ok, nofit]).splitlines()
    assert table[2].startswith("| 4 (auto) | 0.50 s | 0.100 TFLOPS |") and "40.00 tok/s" in table[2]
    assert table[3].startswith("| 64 | does not fit (needs 30.00 GiB, budget 20.00 GiB) | - |")
    sweep = sweep_markdown([ok, nofit])
    assert "### s / a" in sweep and "38.00 / 41.00" in sweep and "commit abc1234" in sweep
    assert "avx512_bf16 yes, amx_bf16 no" in sweep


def test_shipped_sweeps_load_by_name_and_path():
    from cpugen.perf.bench import load_sweep, sweep_names

    assert {"smoke", "small-host", "reference-setting1", "reference-setting2"} <= set(sweep_names())
    s1 = load_sweep("reference-setting1")
    assert s1.model == "gptj-175b" and [(s.prompt_len, s.gen_len) for s in s1.settings] == [(1024, 100)]
    assert s1.settings[0].batch_sizes[:6] == [1, 4, 8, 16, 20, 24]
    s2 = load_sweep(str(ROOT / "configs" / "bench" / "reference-setting2.json"))
    assert (s2.settings[0].prompt_len, s2.settings[0].gen_len) == (512, 50)
    assert s2.settings[0].batch_sizes[:7] == [1, 4, 8, 16, 32, 40, 48]
    assert load_sweep("small-host").model == "gptj-1b"


def test_reference_setting_on_this_host_says_what_each_batch_would_need():
    """gptj-175b cannot load here: every row says so (nothing is allocated), on the planner's numbers."""
    p = cli("bench", "--sweep", "reference-setting1", "--format", "csv", "--memory-budget", "20GiB", "--quiet")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert [r["batch_size"] for r in rows][:6] == ["1", "4", "8", "16", "20", "24"]
    assert all(r["status"].startswith("does not fit (needs ") and "budget 20.00 GiB" in r["status"] for r in rows)
    assert p.stderr == ""


def test_markdown_to_a_file(tmp_path):
    out = tmp_path / "t.md"
    p = cli("bench", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "3", "--batch-sizes", "2",
            "--backend", "eager", "--out", out, "--quiet", env=fake_roofline(tmp_path / "cache"))
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""
    text = out.read_text()
    assert "### bench / 8+3" in text and "| Batch size |" in text and "\n| 2 | " in text


@pytest.mark.parametrize("args, fragments", [
    (["bench", "--sweep", "smoke", "--prompt-len", "8"], ["--prompt-len", "--sweep"]),
    (["bench", "--sweep", "no-such-sweep"], ["unknown sweep 'no-such-sweep'", "smoke"]),
    (["bench", "--model", "tiny-gptj", "--batch-sizes", "1,x"], ["--batch-sizes", "'x'"]),
    (["bench", "--model", "tiny-gptj", "--prompt-len", "8,9,10", "--gen-len", "2,3"], ["--prompt-len has 3"]),
    (["bench", "--model", "tiny-gptj", "--prompt-len", "100", "--gen-len", "100"], ["128 positions"]),
    (["bench", "--model", "tiny-gptj", "--format", "xml"], ["invalid choice"]),
])
def test_bad_bench_input_is_one_line(args, fragments):
    assert_one_line_error(cli(*args), *fragments)


def test_bad_sweep_files_say_what_is_wrong(tmp_path):
    from cpugen.perf.bench import from_dict, load_sweep, parse_batch_sizes
    from cpugen.errors import CpugenError

    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", ')
    with pytest.raises(CpugenError, match="bad.json is not valid JSON"):
        load_sweep(str(bad))
    setting = {"prompt_len": 8, "gen_len": 2, "batch_sizes": [1]}
    for body, fragment in (({"name": "x", "model": "m", "settings": [setting], "colour": 1}, "unknown keys colour"),
                           ({"name": "x", "model": "m", "settings": [{**setting, "batch_sizes": [1, "many"]}]},
                            "settings\\[0\\].batch_sizes"),
                           ({"name": "x", "model": "m", "settings": [{**setting, "gen_len": 0}]}, "gen_len"),
                           ({"name": "x", "model": "m", "settings": [setting], "repeat": 0}, "repeat must be at least 1"),
                           ({"name": "x", "model": "m", "settings": []}, "settings must be a non-empty list"),
                           ({"name": "x", "model": "m", "settings": [setting], "judge": ["tok/s"]},
                            "judge must be a non-empty list of figures from token_throughput"),
                           ({"name": "x", "model": "m", "settings": [{**setting, "judge": []}]}, "settings\\[0\\].judge"),
                           ({"name": "x", "settings": [setting]}, "missing 'model'")):
        with pytest.raises(CpugenError, match=fragment):
            from_dict(body, "t.json")
    with pytest.raises(CpugenError, match="at least 1"):
        parse_batch_sizes("4,0")
    # a setting may judge its own figures (a long prompt's prefill), the others the sweep's
    sw = from_dict({"name": "x", "model": "m", "judge": ["token_throughput"], "settings": [
        setting, {**setting, "name": "long", "prompt_len": 512, "judge": ["prompt_flops"]}]}, "t.json")
    assert [st.judge for st in sw.settings] == [None, ["prompt_flops"]] and sw.judge == ["token_throughput"]


class _Tty:
    """A stderr that says it is a terminal, and keeps what was written."""

    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_on_a_terminal_and_silence_with_quiet(quiet, monkeypatch, tmp_path):
    from cpugen.perf import bench

    _fixed_limits(monkeypatch, tmp_path)
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    sweep = bench.from_dict({"name": "t", "model": "tiny-gptj", "backend": "eager", "settings": [
        {"prompt_len": 8, "gen_len": 4, "batch_sizes": [1, 10**9]}]})
    bench.run_sweep(sweep, quiet=quiet)
    if quiet:
        assert tty.text == ""
    else:  # weights, each batch's plan, its decode steps, and the row that cannot fit
        for fragment in ("weights:", "[1/2] 8+4: batch 1 needs", "prefill+decode: 3/3 decode steps",
                         "[2/2] 8+4: batch 1000000000: does not fit"):
            assert fragment in tty.text, (fragment, tty.text)
