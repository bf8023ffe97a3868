"""What the CPU is and which of its cores this process may use."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """The CPU's model name and the instruction sets cpugen's kernels dispatch on."""
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
    return {"cpu": model, "avx2": {"avx2", "fma"} <= flags, "avx512": {"avx512f", "avx512bw", "avx512vl"} <= flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def usable_cores() -> int:
    from cpugen.host.placement import allowed_cores

    return len(allowed_cores())
