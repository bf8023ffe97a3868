"""The environment every result record carries: machine, threads, library versions, commit."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import psutil
import torch


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    # "avx512": what cpugen's kernels use, AVX-512 F, BW and VL (every AVX-512 server CPU since
    # Skylake-SP has all three; the first Xeon Phis had F alone)
    return {"cpu": model, "avx512": {"avx512f", "avx512bw", "avx512vl"} <= flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def usable_cores() -> int:
    from cpugen.placement import allowed_cores

    return len(allowed_cores())


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ipex_version() -> str | None:
    from cpugen.backends import _import_ipex  # quiet: IPEX's import prints on stdout/stderr

    ipex, _ = _import_ipex()  # absent or broken: either way not usable
    return None if ipex is None else ipex.__version__


def environment(threads: int) -> dict:
    from cpugen import placement

    info = cpu_info()
    return {
        **info,
        "cores": usable_cores(),
        "threads": threads,
        "memory_bytes": psutil.virtual_memory().total,
        "torch_version": torch.__version__,
        "ipex_version": ipex_version(),
        "python_version": platform.python_version(),
        "commit": git_commit(),
        "placement": placement.current.describe() if placement.current else None,
    }
