"""Every CPUGEN_* environment variable, read once, validated, and recorded.

A knob is a switch for A/B runs and for tests: what runs changes with it, so its value goes into
every result record (`knobs`) and into the nightly history's configuration key (runs with the
weights left plain are never compared with packed ones). A value outside a knob's allowed ones is
a one-line `cpugen: error:` naming the variable. `python -m cpugen run --help` lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cpugen.errors import CpugenError


@dataclass(frozen=True)
class Knob:
    name: str
    default: str
    allowed: tuple[str, ...] | None  # None: any value (a path)
    changes_what_runs: bool
    help: str


KNOBS = (
    Knob("CPUGEN_NATIVE", "1", ("1", "0"), True,
         "0: none of cpugen's native kernels (matmuls, attention, norms, GLU, argmax, the decode stack); torch's ops run"),
    Knob("CPUGEN_LAYOUT", "auto", ("auto", "plain", "packed"), True,
         "plain: keep the weights in their plain layout instead of cpugen's packed layout; packed: pack them at load "
         "wherever a packed kernel runs (with AMX, cpugen's tile kernel: ahead of oneDNN at decode batches of 8-32, "
         "behind it in prefill) (auto: with AVX-512 and without AMX, and at the AVX2 level where a timing "
         "once per host finds the packed kernel faster than the gemv at every batch, else for the batches where it is)"),
    Knob("CPUGEN_REORDER", "1", ("1", "0"), True,
         "0: never reorder plain weights into oneDNN's blocked layout for decode batches above the gemv's rows"),
    Knob("CPUGEN_WIDEN", "auto", ("auto", "0"), True,
         "0: on CPUs without AVX-512, keep bf16 matmuls on PyTorch's bf16 GEMM instead of widened fp32 GEMM"),
    Knob("CPUGEN_ISA", "auto", ("auto", "avx2", "avx512", "avx512_bf16", "amx"), True,
         "the whole engine behaves as on a CPU with at most this level: which kernels load, the weights' layout, what "
         "the backend `auto` picks, what the record says (avx512: AVX-512 F/BW/VL without BF16), and torch's and "
         "oneDNN's kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, where not set already); above the CPU's own "
         "level it is an error"),
    Knob("CPUGEN_PIN", "1", ("1", "0"), True, "0: leave the compute threads unpinned"),
    Knob("CPUGEN_HUGEPAGES", "1", ("1", "0"), True,
         "0: do not ask for transparent huge pages for weights and KV cache"),
    Knob("CPUGEN_CACHE", "", None, False,
         "where native builds, measured limits and the AVX2 level's layout timing are cached (default ~/.cache/cpugen)"),
    Knob("CPUGEN_LIMITS", "measured", ("measured", "cached"), False,
         "cached: run and bench judge their figures against the limits `cpugen roofline` cached, instead of "
         "reading them right before and after each row (about a second each)"),
    Knob("CPUGEN_TP_COMM", "auto", ("auto", "gloo"), True,
         "gloo: tensor-parallel ranks on one host all-reduce through gloo instead of shared memory"),
    # Recorded, but never part of the configuration key: it exists to plant a regression that the
    # nightly job must catch when it compares the run with its unslowed history.
    Knob("CPUGEN_TEST_SLOWDOWN", "0", None, False,
         "for tests: each timed prefill and decode step sleeps this fraction of its own time (0.25: both 20 percent slower)"),
)
BY_NAME = {k.name: k for k in KNOBS}
RENAMED = {"CPUGEN_PACK": "CPUGEN_REORDER"}  # a name that meant two things ("pack"): oneDNN's reorder


@dataclass(frozen=True)
class Knobs:
    native: bool
    layout: str
    reorder: bool
    widen: bool
    isa: str
    pin: bool
    hugepages: bool
    cache: Path
    limits: str
    tp_comm: str
    test_slowdown: float
    values: tuple[tuple[str, str], ...]  # (name, value) of every knob, defaults included

    def record(self) -> dict[str, str]:
        """Every knob's value, for the run record."""
        return dict(self.values)

    def key(self) -> str:
        """The knobs that change what runs and differ from their defaults, as 'NAME=value,...'
        ('' for a default run): part of the history's configuration key."""
        return ",".join(f"{n}={v}" for n, v in self.values
                        if BY_NAME[n].changes_what_runs and v != BY_NAME[n].default)


def read(environ=None) -> Knobs:
    """Reads and validates every knob from `environ` (default os.environ)."""
    env = os.environ if environ is None else environ
    for old, new in RENAMED.items():
        if old in env:
            raise CpugenError(f"{old} is now {new} (values {' or '.join(BY_NAME[new].allowed)}): rename it")
    values = []
    for k in KNOBS:
        v = env.get(k.name, k.default)
        if k.allowed is not None and v not in k.allowed:
            raise CpugenError(f"{k.name}={v!r} is not allowed: use one of {', '.join(k.allowed)} ({k.help})")
        values.append((k.name, v))
    v = dict(values)
    try:
        slowdown = float(v["CPUGEN_TEST_SLOWDOWN"])
    except ValueError:
        slowdown = -1.0
    if not 0 <= slowdown <= 10:
        raise CpugenError(f"CPUGEN_TEST_SLOWDOWN={v['CPUGEN_TEST_SLOWDOWN']!r} is not allowed: use a number from 0 to 10 "
                          f"({BY_NAME['CPUGEN_TEST_SLOWDOWN'].help})")
    cache = Path(v["CPUGEN_CACHE"]) if v["CPUGEN_CACHE"] else Path.home() / ".cache" / "cpugen"
    return Knobs(native=v["CPUGEN_NATIVE"] == "1", layout=v["CPUGEN_LAYOUT"], reorder=v["CPUGEN_REORDER"] == "1",
                 widen=v["CPUGEN_WIDEN"] == "auto",
                 isa=v["CPUGEN_ISA"], pin=v["CPUGEN_PIN"] == "1", hugepages=v["CPUGEN_HUGEPAGES"] == "1",
                 cache=cache, limits=v["CPUGEN_LIMITS"], tp_comm=v["CPUGEN_TP_COMM"], test_slowdown=slowdown, values=tuple(values))


@lru_cache(maxsize=1)
def current() -> Knobs:
    """The knobs of this process, read on first use and kept: a variable changed later has no effect
    (tests that change one call reload())."""
    return read()


def reload() -> Knobs:
    current.cache_clear()
    return current()


def help_text() -> str:
    return "environment switches:\n" + "\n".join(
        f"  {k.name}={'|'.join(k.allowed) if k.allowed else 'PATH' if k.name == 'CPUGEN_CACHE' else 'X'} (default {k.default or '~/.cache/cpugen'}): {k.help}"
        for k in KNOBS)
