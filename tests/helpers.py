"""Shared test helpers: running the CLI as a user would, in a fresh process."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# kernels/ holds the kernels' sources beside their reference and checks; it is not a package (the
# top-level name `kernels` is Hugging Face's, which transformers requires and imports), so the tests
# import its scripts by file name: `import check_gemv`, `import reference`
KERNELS = ROOT / "kernels"
if str(KERNELS) not in sys.path:
    sys.path.insert(1, str(KERNELS))


def cli(*args, timeout=300, env=None):
    """Runs `python -m cpugen ARGS` in a subprocess; returns the CompletedProcess."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cpugen", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=e, timeout=timeout)


def assert_one_line_error(p, *fragments):
    """Exit 2, one line on stderr starting `cpugen: error:`, no traceback, each fragment in it."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith("cpugen: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def fake_roofline(cache_dir: Path, hw: float = 100.0, read_gbps: float = 20.0) -> dict:
    """A roofline cache (cpugen/perf/roofline.py) for this machine at every thread count, so runs compare
    with fixed limits instead of measuring them (a 1 GiB read and a large matmul; `hw`: every ISA
    level's register-only limit, TFLOP/s: by default far above what any run here reaches, so that
    none measures it again; `read_gbps`: the read bandwidth, GB/s). Returns the env
    for a child process: CPUGEN_CACHE pointing at it, CPUGEN_NATIVE=0, and CPUGEN_LIMITS=cached, so
    that runs use these limits instead of reading the machine's around each row. CPUGEN_CACHE also
    holds the native kernels' builds (cpugen/runtime/native.py): its ext/ is this process's own
    (`python -m cpugen build`'s), so that the modules a child still loads (the register-only limits',
    the thread pinning's) are not compiled afresh in every fresh cache, a minute each.
    In-process, monkeypatch cpugen.perf.roofline.cache_file."""
    import json

    import torch

    from cpugen.perf import roofline
    from cpugen.host.cpu import cpu_info, usable_cores
    from cpugen.runtime import native

    cache_dir.mkdir(parents=True, exist_ok=True)
    data = {roofline.host_key(t): dict(read_gbps=read_gbps, bf16_tflops=0.2, threads=t, cpu=cpu_info()["cpu"],
                                   torch_version=torch.__version__, read_spread=[0.95 * read_gbps, 1.05 * read_gbps],
                                   tflops_spread=[0.19, 0.21], measured_at=0.0,
                                   hw_tflops={lv: hw for lv in roofline.levels()})
            for t in range(1, usable_cores() + 1)}
    (cache_dir / "roofline.json").write_text(json.dumps(data))
    shared = native.cache_root()
    shared.mkdir(parents=True, exist_ok=True)
    if not (cache_dir / "ext").exists():
        (cache_dir / "ext").symlink_to(shared, target_is_directory=True)
    return {"CPUGEN_CACHE": str(cache_dir), "CPUGEN_NATIVE": "0", "CPUGEN_LIMITS": "cached"}
