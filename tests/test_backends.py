"""--backend auto | eager | ipex where IPEX is absent or broken (the main environment).

IPEX's absence is forced (sys.modules entry None, or a fake package on the path), so these hold in
any environment; the one subprocess test of a real absence runs only where IPEX is not installed.
The IPEX environment's own tests are tests/test_ipex.py (`-m ipex`)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from cpugen import knobs
from cpugen.runtime import eager
from cpugen.runtime import ipex as ipex_backend
from cpugen.runtime import backends
from cpugen.cli import main
from cpugen.model.config import from_name
from cpugen.host.cpu import cpu_info
from cpugen.errors import CpugenError
from cpugen.model.weights import random_model

REPO = Path(__file__).resolve().parent.parent
RUN = ["run", "--model", "tiny-gptj", "--prompt-len", "8", "--gen-len", "3"]
GENERATE = ["generate", "--model", "tiny-gptj", "--prompt-ids", "5,6,7", "--max-new-tokens", "3"]


@pytest.fixture
def no_ipex(monkeypatch):
    """This process behaves as if IPEX were not installed."""
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # import -> ImportError
    monkeypatch.setattr(ipex_backend, "_import", None)


@pytest.fixture
def fake_ipex(monkeypatch):
    """Sets what `import_ipex` returns, without importing anything."""
    def install(module, why=None):
        monkeypatch.setattr(ipex_backend, "_import", (module, why))
    return install


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cpugen: error: ")
    return lines[0]


@pytest.mark.parametrize("argv", [RUN, GENERATE], ids=["run", "generate"])
def test_ipex_missing_is_one_line_and_exit_2(no_ipex, capfd, argv):
    assert main([*argv, "--backend", "ipex", "--json", "-"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    line = _one_error_line(err)
    assert "--backend ipex needs intel-extension-for-pytorch" in line
    assert "scripts/ipex_env.sh" in line


@pytest.mark.skipif(importlib.util.find_spec("intel_extension_for_pytorch") is not None,
                    reason="IPEX is installed here")
def test_ipex_missing_for_real_subprocess():
    p = subprocess.run([sys.executable, "-m", "cpugen", *RUN, "--backend", "ipex", "--json", "-"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    line = _one_error_line(p.stderr)
    assert "No module named 'intel_extension_for_pytorch'" in line
    assert "scripts/ipex_env.sh" in line


@pytest.mark.parametrize("argv", [RUN, GENERATE], ids=["run", "generate"])
def test_auto_falls_back_to_eager(no_ipex, capfd, argv):
    assert main([*argv, "--backend", "auto", "--json", "-"]) == 0
    out, err = capfd.readouterr()
    rec = json.loads(out)
    if argv is RUN:
        assert rec["backend"] == "eager"
        assert rec["ipex_version"] is None
    else:
        assert len(rec["tokens"][0]) == 3


def test_default_backend_is_auto(no_ipex, capfd):
    assert main([*RUN, "--json", "-"]) == 0
    assert json.loads(capfd.readouterr().out)["backend"] == "eager"


@pytest.mark.parametrize("argv", [RUN, GENERATE], ids=["run", "generate"])
def test_unknown_backend_is_one_line(capfd, argv):
    assert main([*argv, "--backend", "tpu"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    line = _one_error_line(err)
    assert "unknown backend 'tpu'" in line and "auto, eager, ipex" in line


def test_resolve_eager_never_imports_ipex(monkeypatch):
    def boom():
        raise AssertionError("eager must not import IPEX")
    monkeypatch.setattr(ipex_backend, "import_ipex", boom)
    assert backends.resolve("eager") == "eager"


def test_apply_eager_leaves_the_model_alone():
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert backends.apply(model, "eager", torch.bfloat16) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the norms are torch's, or cpugen's native kernel for the same computation (no IPEX fusion)
    from cpugen.runtime.eager import NativeNorm

    assert all(n.impl is None or isinstance(n.impl, NativeNorm) for n in (model.ln_f, *(b.ln_1 for b in model.blocks)))


def test_auto_takes_eager_where_ipex_cannot_do_bf16(fake_ipex, monkeypatch):
    monkeypatch.setattr(eager, "available", lambda build=True: False)  # a CPU without AVX512-BF16
    no_bf16 = types.SimpleNamespace(_C=types.SimpleNamespace(onednn_has_bf16_support=lambda: False))
    fake_ipex(no_bf16)
    assert backends.resolve("auto") == "eager"
    assert backends.resolve("ipex") == "ipex"  # asked for explicitly: optimize says why it cannot
    fake_ipex(types.SimpleNamespace(_C=types.SimpleNamespace(onednn_has_bf16_support=lambda: True)))
    assert backends.resolve("auto") == "ipex"


def test_auto_prefers_the_native_kernels_over_ipex_for_bf16(fake_ipex, monkeypatch):
    """Measured faster than ipex at batch 1, 4 and 16 (docs/performance.md); fp32 has no native kernels."""
    fake_ipex(types.SimpleNamespace(_C=types.SimpleNamespace(onednn_has_bf16_support=lambda: True)))
    monkeypatch.setattr(eager, "available", lambda build=True: True)
    assert backends.resolve("auto", "bfloat16") == "eager"
    assert backends.resolve("auto", "float32") == "ipex"
    assert backends.resolve("ipex", "bfloat16") == "ipex"  # asked for by name: given


@pytest.mark.skipif(not cpu_info()["avx512"], reason="below AVX-512 `auto` never weighs the native kernels against ipex")
def test_native_kernels_are_found_where_the_cpu_has_them(monkeypatch):
    """At both AVX-512 levels (the packed layout runs at either), the eager backend's kernels are
    found, so `auto` takes them over ipex; not at AVX2 (IPEX's bf16 needs AVX-512 anyway), nor
    with CPUGEN_NATIVE=0."""
    assert eager.available()
    monkeypatch.setenv("CPUGEN_ISA", "avx512")
    knobs.reload()
    assert eager.available()
    monkeypatch.setenv("CPUGEN_ISA", "avx2")
    knobs.reload()
    assert not eager.available()
    monkeypatch.delenv("CPUGEN_ISA")
    monkeypatch.setenv("CPUGEN_NATIVE", "0")
    knobs.reload()
    assert not eager.available()


def test_optimize_failure_is_one_line(fake_ipex):
    def optimize(model, **kw):
        raise AssertionError("BF16 weight prepack needs the cpu support avx_ne_convert or avx512bw\nmore")
    fake_ipex(types.SimpleNamespace(optimize=optimize))
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    with pytest.raises(CpugenError) as e:
        backends.apply(model, "ipex", torch.bfloat16)
    msg = str(e.value)
    assert "\n" not in msg
    assert "ipex.optimize failed for bfloat16" in msg and "--backend eager" in msg


BROKEN_IPEX = """\
import os
# what IPEX 2.8 does under another torch: print its reason on stdout, then fail
print("ERROR! Intel(R) Extension for PyTorch* needs to work with PyTorch 2.8.*, but PyTorch 9.9 is found. "
      "Please switch to the matching version and run again.")
os.write(2, b"[W OperatorEntry.cpp] Warning: Overriding a previously registered kernel\\n")
os.exit(127)
"""


@pytest.fixture
def broken_ipex_env(tmp_path):
    pkg = tmp_path / "intel_extension_for_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(BROKEN_IPEX))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_broken_ipex_auto_keeps_stdout_clean(broken_ipex_env):
    """IPEX's own import prints on stdout; `--json -` must still be exactly one JSON document."""
    p = subprocess.run([sys.executable, "-m", "cpugen", *RUN, "--backend", "auto", "--json", "-"],
                       capture_output=True, text=True, cwd=REPO, env=broken_ipex_env, timeout=300)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["backend"] == "eager" and rec["ipex_version"] is None
    assert "ERROR!" not in p.stdout + p.stderr and "Overriding" not in p.stderr


def test_broken_ipex_explicit_says_why(broken_ipex_env):
    p = subprocess.run([sys.executable, "-m", "cpugen", *RUN, "--backend", "ipex", "--json", "-"],
                       capture_output=True, text=True, cwd=REPO, env=broken_ipex_env, timeout=300)
    assert p.returncode == 2
    assert p.stdout == ""
    line = _one_error_line(p.stderr)
    assert "needs to work with PyTorch 2.8" in line and "scripts/ipex_env.sh" in line
