"""CPUGEN_* knobs: read once, validated with a one-line error, recorded in every record and in the
history's configuration key; native builds keyed by what they are built from."""

import json
import shutil

import pytest

from cpugen import knobs
from cpugen.errors import CpugenError
from helpers import ROOT, assert_one_line_error, cli, fake_roofline


@pytest.mark.parametrize("var, value", [("CPUGEN_LAYOUT", "packd"), ("CPUGEN_NATIVE", "no"), ("CPUGEN_PIN", "2"),
                                        ("CPUGEN_ISA", "avx9")])
def test_a_bad_knob_is_a_one_line_error_naming_it_and_its_values(var, value):
    p = cli("plan", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "4", env={var: value})
    line = assert_one_line_error(p, var, repr(value))
    assert all(v in line for v in knobs.BY_NAME[var].allowed)


def test_the_old_name_of_the_reorder_switch_says_its_new_one():
    p = cli("plan", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "4", env={"CPUGEN_PACK": "0"})
    assert_one_line_error(p, "CPUGEN_PACK", "CPUGEN_REORDER")


def test_knobs_are_read_once_and_keyed_by_what_differs_from_the_defaults():
    k = knobs.read({"CPUGEN_LAYOUT": "plain", "CPUGEN_CACHE": "/tmp/x"})
    assert k.layout == "plain" and k.native and str(k.cache) == "/tmp/x"
    assert k.key() == "CPUGEN_LAYOUT=plain"  # the cache path changes where builds live, not what runs
    assert knobs.read({}).key() == ""
    assert k.record()["CPUGEN_CACHE"] == "/tmp/x" and set(k.record()) == set(knobs.BY_NAME)
    with pytest.raises(CpugenError):
        knobs.read({"CPUGEN_HUGEPAGES": "off"})


def test_knobs_are_in_the_run_record(tmp_path):
    env = {**fake_roofline(tmp_path), "CPUGEN_LAYOUT": "plain", "CPUGEN_HUGEPAGES": "0"}
    p = cli("run", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "3", "--json", "-", env=env)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["knobs"]["CPUGEN_LAYOUT"] == "plain" and rec["knobs"]["CPUGEN_NATIVE"] == "0"
    # the test session runs unpinned (conftest.py): CPUGEN_PIN=0 is in the key too
    assert rec["knobs_key"] == "CPUGEN_NATIVE=0,CPUGEN_LAYOUT=plain,CPUGEN_PIN=0,CPUGEN_HUGEPAGES=0"
    assert "CPUGEN_LAYOUT" in cli("run", "--help").stdout  # the switches are listed for users


def test_runs_with_other_knobs_are_another_configuration_in_the_history():
    """Five runs at the defaults, then one with the weights left plain and far slower: compared
    with nothing (a new configuration), so no regression; the same drop at the defaults is one."""
    from cpugen.perf import history

    base = dict(cpu="Test CPU", model="gptj-1b", n_layer=1, backend="eager", dtype="bfloat16", prompt_len=32,
                gen_len=4, batch_size=4, threads=2, status="ok", prompt_flops=1e11, peak_rss_bytes=3 * 10**9)
    past = [{**base, "token_throughput": 100.0 + i, "knobs_key": ""} for i in range(4)] + [{**base, "token_throughput": 101.0}]
    plain = {**base, "token_throughput": 60.0, "knobs_key": "CPUGEN_LAYOUT=plain"}
    found = history.compare([plain], past)
    assert not any(f.regressed for f in found) and all(f.baseline is None for f in found)
    assert any(f.regressed for f in history.compare([{**plain, "knobs_key": ""}], past))
    assert "CPUGEN_LAYOUT=plain" in history.describe(plain)


def test_native_builds_are_keyed_by_their_sources(tmp_path, monkeypatch):
    """Identical sources share a build directory; a changed header (included two levels down)
    gives another, so two checkouts never rebuild each other's kernels."""
    from cpugen.runtime import native

    src = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", src)
    monkeypatch.setattr(native, "source_dir", lambda: ROOT / "kernels")
    before = {n: native.build_key(n) for n in native.MODULES}
    monkeypatch.setattr(native, "source_dir", lambda: src)
    assert {n: native.build_key(n) for n in native.MODULES} == before
    (src / "vec_math.h").write_text((src / "vec_math.h").read_text() + "\n// changed\n")
    after = {n: native.build_key(n) for n in native.MODULES}
    assert all(after[n] != before[n] for n in native.MODULES)  # every module includes vec_math.h


def test_a_budget_too_small_to_compile_the_kernels_is_refused_before_anything_runs(tmp_path):
    """With nothing built (an empty cache) and pinning on, the thread-pinning module would be
    compiled first: under a budget that cannot hold the compiler beside the runtime, say so."""
    env = {"CPUGEN_CACHE": str(tmp_path / "empty"), "CPUGEN_PIN": "1"}
    p = cli("run", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "3", "--memory-budget", "1GiB", env=env)
    assert_one_line_error(p, "not built", "python -m cpugen build")
    assert not (tmp_path / "empty" / "ext").exists() or not any((tmp_path / "empty" / "ext").rglob("*.so"))
