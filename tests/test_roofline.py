"""The roofline: the cache round trip and the decode roofline formula by hand."""

import torch

from cpugen.model import shapes
from cpugen.perf import flops
from cpugen.perf import roofline
from cpugen.model.config import from_name
from cpugen.perf.measure import decode_roofline_s


def test_measure_gives_plausible_limits_and_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(roofline, "cache_file", lambda: tmp_path / "roofline.json")
    monkeypatch.setattr(roofline, "measure_bandwidth", lambda repeats=7, nbytes=0: (31.0, 30.0, 32.0))
    r = roofline.get(torch.get_num_threads())
    assert r.read_gbps == 31.0 and r.read_spread == (30.0, 32.0) and r.bf16_tflops > 0.01
    again = roofline.load_cached(torch.get_num_threads())
    assert again == r  # from the file, not measured again
    assert roofline.load_cached(torch.get_num_threads() + 1) is None  # another thread count


def test_bandwidth_measurement_reads_memory():
    med, lo, hi = roofline.measure_bandwidth(repeats=3, nbytes=256 << 20)
    assert 1 < lo <= med <= hi < 1000  # GB/s: a real measurement on any machine


def test_decode_roofline_by_hand():
    cfg = from_name("gptj-1b")
    r = roofline.Roofline(read_gbps=30.0, bf16_tflops=0.4, threads=2, cpu="x", torch_version="t")
    B, P, G = 16, 128, 3
    w = shapes.streamed_params(cfg) * 2
    want = []
    for c in (P + 1, P + 2):  # the two decode steps of a 3-token generation
        kv = 2 * cfg.n_layer * B * cfg.n_kv_head * c * cfg.head_dim * 2
        want.append(max((w + kv) / 30e9, B * flops.token_flops(cfg, c) / 0.4e12))
    assert decode_roofline_s(cfg, r, B, P, G, 2) == sum(want) / 2


def test_run_says_when_it_beats_the_cached_limits(tmp_path):
    """Cached limits below what the machine does now (a shared host that sped up, or a stale
    cache) would report efficiencies above 100%: the run says so on stderr and how to refresh, and
    stays quiet when its figures are below the limits."""
    import json

    from helpers import cli, fake_roofline

    args = ("run", "--model", "tiny-gptj", "--prompt-len", "16", "--gen-len", "4", "--batch-size", "2",
            "--backend", "eager", "--json", "-")
    env = fake_roofline(tmp_path)  # 20 GB/s, 0.2 TFLOP/s: far above what a tiny model's steps reach
    quiet = cli(*args, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert "beat the cached limits" not in quiet.stderr
    cache = tmp_path / "roofline.json"
    slow = {k: {**v, "read_gbps": 1e-4, "bf16_tflops": 1e-9} for k, v in json.loads(cache.read_text()).items()}
    cache.write_text(json.dumps(slow))
    loud = cli(*args, env=env)
    assert loud.returncode == 0, loud.stderr
    rec = json.loads(loud.stdout)  # stdout still holds only the record
    assert rec["decode_efficiency"] > 1.05 and rec["prefill_efficiency"] > 1.05
    note = [ln for ln in loud.stderr.splitlines() if "beat the cached limits" in ln]
    assert len(note) == 1 and "python -m cpugen roofline --refresh" in note[0]
    if rec.get("hw_level"):  # judged against the level's register-only limit (100 TFLOP/s here), not torch.mm's
        assert rec["decode_efficiency_hw"] > 1.05 and rec["prefill_efficiency_hw"] < 1
        assert "decode" in note[0] and "prefill" not in note[0] and "register-only limit" in note[0]
    else:
        assert "decode" in note[0] and "prefill" in note[0] and "torch.mm" in note[0]


def test_register_only_limits_are_exact_chains_and_no_library_beats_them():
    import helpers  # noqa: F401  (puts kernels/ on the path)
    from cpugen.runtime.native import extension
    import check_peak  # kernels/, by file name (tests/helpers.py)

    ext = extension("peak")
    assert ext is not None  # every x86-64 CPU with AVX2 and FMA builds it
    assert len(check_peak.check_sums(ext)) == 4 * len(roofline.levels())
    fma, mm = check_peak.check_rate()
    assert mm <= 1.1 * fma


def test_the_bandwidth_takes_the_native_read_whose_bytes_add_up():
    """Where kernels/peak.cpp runs, the roofline's read bandwidth is the best of torch's reductions
    and its read of several streams a thread, which adds up every byte of the buffer once (against
    torch's sum of the same bytes, with tails at every stream and thread count)."""
    import helpers  # noqa: F401  (puts kernels/ on the path)
    from cpugen.runtime.native import extension
    import check_peak  # kernels/, by file name (tests/helpers.py)

    ext = extension("peak")
    assert ext is not None
    assert check_peak.check_read(ext) == 7 * (2 + len(roofline.READ_STREAMS)) * 3
    x = torch.ones(1 << 20)
    ops = roofline.readers(x)
    assert len(ops) == 3 + len(roofline.READ_STREAMS)
    assert [op() for op in ops[3:]] == [int(x.view(torch.uint8).sum(dtype=torch.int64))] * len(roofline.READ_STREAMS)


def test_a_run_reports_efficiency_against_the_hardware_of_its_level(tmp_path):
    import json

    from helpers import cli, fake_roofline

    env = fake_roofline(tmp_path / "cache")  # every level's limit: 100 TFLOP/s, never beaten here
    r = cli("run", "--model", "gptj-1b", "--layers", "1", "--prompt-len", "32", "--gen-len", "4", "--json", "-",
            "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["hw_level"] == roofline.run_level() and rec["hw_tflops"] == 100.0
    assert abs(rec["prefill_efficiency_hw"] - rec["prompt_flops"] / 100e12) < 1e-9
    assert rec["decode_efficiency_hw"] <= rec["decode_efficiency"] + 1e-12  # the same step, a higher ceiling


def test_a_cached_hardware_limit_that_a_run_beats_is_measured_again(tmp_path):
    """A register-only limit cached while another process shared the cores reads low, and a run
    would report more than 100% of the hardware: the run measures it again, reports against the
    larger of the two, and the cache keeps it."""
    import json

    from helpers import cli, fake_roofline

    # far below what any prefill reaches; the bandwidth far above what any decode streams (20 GB/s,
    # the default, is beaten by torch's own path on a host that reads 45)
    env = fake_roofline(tmp_path / "cache", hw=1e-6, read_gbps=1000.0)
    r = cli("run", "--model", "gptj-1b", "--layers", "1", "--prompt-len", "32", "--gen-len", "4", "--json", "-",
            "--quiet", env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    # this process's own reading
    measured = roofline.level_limit(roofline.measure_hw(torch.get_num_threads()), rec["hw_level"])[1]
    assert 0.5 * measured < rec["hw_tflops"] < 2 * measured
    assert rec["prefill_efficiency_hw"] < 1 and rec["decode_efficiency_hw"] < 1
    cached = json.loads((tmp_path / "cache" / "roofline.json").read_text())
    assert all(roofline.level_limit(v["hw_tflops"], rec["hw_level"])[1] == rec["hw_tflops"]
               for v in cached.values() if v["threads"] == rec["threads"])


def test_a_levels_limit_is_the_fastest_instruction_it_has():
    """Intel's Xeons issue vdpbf16ps at half AVX-512 FMA's rate: the avx512_bf16 level's limit is
    then FMA's, as cpugen's packed kernel multiplies with FMA there; a level never takes the limit
    of one above it."""
    intel = {"avx2": 0.26, "avx512": 0.48, "avx512_bf16": 0.24, "amx": 7.2}
    zen5 = {"avx2": 0.27, "avx512": 0.54, "avx512_bf16": 1.085}
    assert roofline.level_limit(intel, "avx512_bf16") == ("avx512", 0.48)
    assert roofline.level_limit(intel, "amx") == ("amx", 7.2)
    assert roofline.level_limit(intel, "avx2") == ("avx2", 0.26)
    assert roofline.level_limit(zen5, "avx512_bf16") == ("avx512_bf16", 1.085)
    assert roofline.level_limit(zen5, "avx512") == ("avx512", 0.54)
    assert roofline.level_limit(zen5, "amx") == ("avx512_bf16", 1.085)  # a cap above the CPU: what it has
    assert roofline.level_limit({}, "avx2") == (None, None) and roofline.level_limit(zen5, None) == (None, None)


def test_run_reads_the_limits_right_before_and_after_it_and_says_when_it_beat_them():
    import json

    from helpers import cli

    r = cli("run", "--model", "tiny-gptj", "--prompt-len", "16", "--gen-len", "4", "--batch-size", "2", "--backend",
            "eager", "--json", "-")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["limits_source"] == "measured around this row"
    before, after = rec["limits_before"], rec["limits_after"]
    assert rec["roofline_read_gbps"] == (before["read_gbps"] + after["read_gbps"]) / 2
    assert rec["roofline_bf16_tflops"] == (before["bf16_tflops"] + after["bf16_tflops"]) / 2
    # above 100% of them, never without a word: which limits, and by how much
    from cpugen.perf.measure import stale_limits_note
    from cpugen.perf.record import RunRecord

    figures = ("decode_efficiency_hw", "prefill_efficiency_hw") if rec.get("hw_level") else (
        "decode_efficiency", "prefill_efficiency")  # what the views judge against
    beat = RunRecord.from_dict({**rec, figures[0]: 1.03, figures[1]: 0.5})
    note = stale_limits_note(beat)
    assert "beat the limits read right before and after it" in note and "decode 103%" in note
    assert "prefill" not in note.split("(")[1].split(")")[0]
    assert stale_limits_note(RunRecord.from_dict({**rec, figures[0]: 0.99, figures[1]: 1.0})) is None


def test_views_judge_a_run_against_the_hardware_of_its_level_and_keep_torch_mm_in_the_record():
    """A prefill faster than torch.mm's route (cpugen's own kernel on a CPU where PyTorch widens
    bf16 to fp32) is not a figure above 100%: the table and the stderr note judge against the
    level's register-only limit, and the line above the table names both peaks."""
    from cpugen.perf.measure import stale_limits_note
    from cpugen.perf.record import COLUMNS, RunRecord, limits_line, markdown, summary

    base = dict(model="m", backend="eager", dtype="bfloat16", batch_size=8, prompt_len=32, gen_len=8, n_layer=2,
                n_params=1, weight_bytes=1, kv_cache_bytes=1, prompt_time_s=0.3, prompt_flops=0.175e12,
                prompt_flop_per_seq=1.0, decode_time_per_token_s=0.02, decode_time_median_s=0.02,
                decode_time_min_s=0.02, decode_time_max_s=0.02, decode_steps=7, token_throughput=400.0,
                token_flops=1.0, token_flop_per_seq=1.0, decode_weight_gbps=20.0, peak_rss_bytes=1, threads=2,
                torch_version="t", cpu="c", roofline_read_gbps=39.6, roofline_bf16_tflops=0.162,
                decode_efficiency=0.77, prefill_efficiency=1.08, limits_source="measured around this row")
    hw = RunRecord.from_dict({**base, "hw_level": "avx2", "hw_tflops": 0.205, "prefill_efficiency_hw": 0.854,
                              "decode_efficiency_hw": 0.768})
    cells = markdown([hw]).splitlines()[2].split(" | ")
    names = [c for c, _ in COLUMNS]
    assert cells[names.index("Prefill vs peak")] == "85%" and cells[names.index("Decode vs roofline")] == "77%"
    line = limits_line([hw])
    assert "avx2 level's register-only limit, 0.205 TFLOP/s" in line and "torch.mm's bf16 rate 0.162" in line
    assert "prefill at 108% of it" in line and line in summary(hw)
    assert stale_limits_note(hw) is None  # 108% of torch.mm's rate is not a beaten limit
    off_x86 = RunRecord.from_dict(base)  # no register-only limit: torch.mm's rate is the peak, and says so
    assert markdown([off_x86]).splitlines()[2].split(" | ")[names.index("Prefill vs peak")] == "108%"
    assert "no register-only limit" in limits_line([off_x86])
    note = stale_limits_note(off_x86)
    assert "prefill 108%" in note and "torch.mm's bf16 rate" in note
