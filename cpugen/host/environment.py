"""The environment every result record carries: machine, threads, library versions, commit, knobs."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import psutil
import torch

from cpugen import knobs
from cpugen.host import placement
from cpugen.host.cpu import cpu_info, library_caps, usable_cores


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ipex_version() -> str | None:
    """The installed IPEX's version, from its package metadata (importing IPEX prints notices and
    takes seconds: the record needs only the version)."""
    try:
        return metadata.version("intel-extension-for-pytorch")
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict:
    return {
        **cpu_info(),
        "cores": usable_cores(),
        "threads": threads,
        "memory_bytes": psutil.virtual_memory().total,
        "torch_version": torch.__version__,
        # the libraries' own levels: what ATen's kernels dispatch at, and the caps set (cap_libraries)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "library_caps": library_caps(),
        "ipex_version": ipex_version(),
        "python_version": platform.python_version(),
        "commit": git_commit(),
        "placement": placement.current.describe() if placement.current else None,
        "knobs": knobs.current().record(),
        "knobs_key": knobs.current().key(),
    }
