"""What the CPU is and which of its cores this process may use."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path


LEVELS = ("avx2", "avx512", "avx512_bf16", "amx")  # cpugen's x86 levels, each including those before it


@lru_cache(maxsize=1)
def _hardware() -> dict:
    """The CPU's model name and the instruction sets cpugen's kernels dispatch on, as it has them."""
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


def top_level(info: dict) -> str | None:
    """The highest of LEVELS that `info`'s flags give, or None (no AVX2, or not x86-64)."""
    have = [info["avx2"], info["avx512"], info["avx2"] and info["avx512"] and info["avx512_bf16"],
            info["avx512"] and info["amx_bf16"]]
    top = None
    for name, ok in zip(LEVELS, have):
        if not ok:
            break
        top = name
    return top


def cpu_info() -> dict:
    """The CPU's model name and the instruction sets cpugen's kernels dispatch on, capped at
    CPUGEN_ISA's level where it names one: every decision and record then reads a CPU with at most
    that level. `isa` is the level cpugen runs at, `cpu_isa` the CPU's own. A level above the
    CPU's is a one-line error."""
    from cpugen import knobs
    from cpugen.errors import CpugenError

    hw = _hardware()
    own = top_level(hw)
    cap = knobs.current().isa
    if cap == "auto":
        return {**hw, "isa": own, "cpu_isa": own}
    if own is None or LEVELS.index(cap) > LEVELS.index(own):
        raise CpugenError(f"CPUGEN_ISA={cap} is above this CPU's level ({own or 'no AVX2'}): use auto"
                          + "".join(f" or {lv}" for lv in LEVELS[: LEVELS.index(own) + 1] if own))
    i = LEVELS.index(cap)
    return {**hw, "avx512": hw["avx512"] and i >= 1, "avx512_bf16": hw["avx512_bf16"] and i >= 2,
            "amx_bf16": hw["amx_bf16"] and i >= 3, "isa": cap, "cpu_isa": own}


# What CPUGEN_ISA asks of the libraries under cpugen, so that a capped level holds for the whole
# process: PyTorch's vectorized ops (ATen's kernels by CPU capability) and oneDNN's (torch's bf16
# matmuls on plain weights, the reordered layout, prefill above cpugen's kernels). Both read their
# variable once, at their first kernel: open_session sets them before any.
# IPEX's LLM path multiplies bf16 through libxsmm (bundled in IPEX), which takes its own variable:
# without it, HF + IPEX "capped" at avx512_bf16 ran prefill at 1.5-2x the vdpbf16ps limit (on AMX).
LIBRARY_CAPS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "LIBXSMM_TARGET": "hsw"},
                "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "LIBXSMM_TARGET": "skx"},
                "avx512_bf16": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                                "LIBXSMM_TARGET": "cpx"},
                "amx": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "LIBXSMM_TARGET": "spr"}}


def cap_libraries() -> dict[str, str | None]:
    """Under CPUGEN_ISA=level, sets LIBRARY_CAPS[level] in the environment, each only where the user
    has not set it; returns library_caps()."""
    from cpugen import knobs

    cap = knobs.current().isa
    if cap != "auto":
        for name, value in LIBRARY_CAPS[cap].items():
            os.environ.setdefault(name, value)
    return library_caps()


def library_caps() -> dict[str, str | None]:
    """Both libraries' cap variables as they stand (None: unset), for the record."""
    return {name: os.environ.get(name) for name in LIBRARY_CAPS["avx2"]}


def usable_cores() -> int:
    from cpugen.host.placement import allowed_cores

    return len(allowed_cores())
