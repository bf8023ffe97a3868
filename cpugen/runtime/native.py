"""Building and loading cpugen's native CPU kernels (C++ in kernels/).

Each kernel module is built through torch.utils.cpp_extension into
`<CPUGEN_CACHE>/ext/<name>-<key>/`, where the key hashes the module's sources (its .cpp and every
header it includes), the compiler flags and the torch version: identical sources share a build,
different ones (two checkouts, two versions) keep theirs side by side. A later process loads the
cached build in well under a second.

Compiling peaks at about 1.6 GiB of resident memory in the compiler, outside every plan, so the
install step builds them (`python -m cpugen build`: side by side, one child process per core as
the free memory allows); a run that would have to build them first says so (`missing_builds`)
and builds them one at a time. Where a build is impossible (no compiler, no ninja) or the CPU lacks
the instructions, `extension()` is None, `why_not()` says why, and callers run torch's ops.
What installs the kernels into a model: eager.py; the decode stack: stack.py.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from cpugen import knobs
from cpugen.host.cpu import cpu_info, usable_cores

MODULES = ("gemv_bf16", "decode_attention")  # AVX-512 kernels
PORTABLE = ("threads",)  # thread pinning: any x86-64 or ARM CPU
X86 = ("peak", "avx2", "decode_layer")  # any x86-64 CPU with AVX2 and FMA: the roofline's register-only
#   limits, every step kernel at the AVX2 level, and the decode stack (at the level it is given)
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LDFLAGS = ("-fopenmp",)
BUILD_PEAK_BYTES = 1600 * 2**20  # the compiler's resident peak, building the kernels into an empty cache
STALE_LOCK_S = 600  # a build takes under a minute; an older lock was left by a process killed mid-build

_why: dict[str, str] = {}


def source_dir() -> Path:
    """kernels/ ships inside the wheel as `cpugen.kernels`; in a checkout it is beside the package."""
    try:
        return Path(str(resources.files("cpugen.kernels")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels"


def cache_root() -> Path:
    return knobs.current().cache / "ext"


def _headers(source: Path, seen: set | None = None) -> list[Path]:
    """The kernels/ headers a source includes (`#include "x.h"`), and those they include."""
    seen = set() if seen is None else seen
    for n in re.findall(r'^#include "([^"]+)"', source.read_text(), re.M):
        h = source.parent / n
        if h.exists() and h not in seen:
            seen.add(h)
            _headers(h, seen)
    return sorted(seen)


def build_key(name: str) -> str:
    """A hash of what the build of kernels/<name>.cpp depends on: sources, flags, torch version."""
    source = source_dir() / f"{name}.cpp"
    h = hashlib.sha256()
    for p in [source, *_headers(source)]:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join((*CFLAGS, *LDFLAGS, torch.__version__)).encode())
    return h.hexdigest()[:16]


def build_dir(name: str) -> Path:
    return cache_root() / f"{name}-{build_key(name)}"


def is_built(name: str) -> bool:
    return (build_dir(name) / f"cpugen_{name}.so").exists()


def can_run(name: str) -> str | None:
    """Why kernels/<name>.cpp cannot run on this CPU, or None."""
    if name in X86:
        return None if cpu_info()["avx2"] else "the CPU lacks AVX2 and FMA (or is not x86-64)"
    if name not in PORTABLE and not cpu_info()["avx512"]:
        return "the CPU lacks AVX-512 (F, BW and VL)"
    return None


def switch_off(name: str) -> str:
    """The knob that runs without kernels/<name>.cpp."""
    return "CPUGEN_PIN=0" if name in PORTABLE else "CPUGEN_NATIVE=0"


def missing_builds() -> list[str]:
    """The kernel modules this machine would compile before a run could use them."""
    k = knobs.current()
    info = cpu_info()
    # AVX-512 without BF16 takes its decode attention from the AVX2 module
    level_modules = (*MODULES, *(() if info["avx512_bf16"] else ("avx2",))) if info["avx512"] else ("avx2",)
    wanted = [*(PORTABLE if k.pin else ()), *((*level_modules, "decode_layer") if k.native else ())]
    return [n for n in wanted if can_run(n) is None and not is_built(n)]


def level() -> str | None:
    """The level cpugen's kernels run at on this CPU (capped by CPUGEN_ISA): avx512_bf16, avx512,
    avx2, or None where none of them can (no AVX2, not x86-64)."""
    info = cpu_info()
    return next((n for n in ("avx512_bf16", "avx512", "avx2") if info[n]), None)


def step_kernels():
    """The extension holding the gemv, norm, GLU product and argmax at this CPU's level (kernels/
    gemv_bf16.cpp with AVX-512, kernels/avx2.cpp with AVX2 alone), or None."""
    if not knobs.current().native:
        return None
    return extension("gemv_bf16") if cpu_info()["avx512"] else extension("avx2") if cpu_info()["avx2"] else None


def compile_module(name: str):
    """cpp_extension.load of kernels/<name>.cpp into its build directory, compiling it first where it
    is not cached, whatever this CPU can run (importing a module runs only its CPU checks)."""
    from torch.utils import cpp_extension

    build = build_dir(name)
    build.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build / "lock")
    return cpp_extension.load(name=f"cpugen_{name}", sources=[str(source_dir() / f"{name}.cpp")],
                              extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(build),
                              verbose=False)


def extension(name: str = "gemv_bf16"):
    """The compiled module for kernels/<name>.cpp (built first if it is not cached), or None, with
    the reason in `why_not(name)`. Whether this CPU, capped by CPUGEN_ISA, may run it is asked on
    every call: a process that lowers the cap (knobs.reload) gets None for a module it loaded
    before, never the higher level's kernels."""
    why = can_run(name)
    if why:
        _why[name] = why
        return None
    return _load(name)


@lru_cache(maxsize=None)
def _load(name: str):
    """extension()'s load, once a process: the module, or None with the reason in `why_not(name)`."""
    try:
        if not is_built(name):
            print(f"cpugen: building kernels/{name}.cpp for this machine and torch {torch.__version__} "
                  f"(once, about half a minute; cached in {build_dir(name)})", file=sys.stderr)
        return compile_module(name)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back
        _why[name] = failure(e)
        print(f"cpugen: native {name} unavailable ({_why[name]}); "
              + ("threads stay unpinned" if name in PORTABLE else "using torch's ops"), file=sys.stderr)
        return None


def why_not(name: str = "gemv_bf16") -> str | None:
    return _why.get(name)


def build_jobs() -> int:
    """How many modules to compile at once: one per usable core (each compiler is one thread), as
    many as the memory free now holds at BUILD_PEAK_BYTES each."""
    import psutil

    from cpugen.host.cgroup import cgroup_room

    room = min(r for r in (psutil.virtual_memory().available, cgroup_room()) if r is not None)
    return max(1, min(usable_cores(), room // BUILD_PEAK_BYTES))


def failure(e: Exception) -> str:
    """A failed build in one line."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def compile_parallel(names, jobs: int | None = None) -> dict[str, float | str]:
    """Compiles the modules of `names` not yet built, up to `jobs` (build_jobs()) at a time, each in
    a child process of its own (cpp_extension's compiler is one thread a module): name -> the
    seconds its build took, or why it failed (failure()); nothing where fewer than 2 would run at
    once. Loading a module afterwards finds it cached."""
    import os
    import subprocess
    import tempfile

    todo = [n for n in names if not is_built(n)]
    jobs = min(len(todo), jobs or build_jobs())
    if jobs < 2:
        return {}
    root = str(Path(__file__).resolve().parents[2])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cpugen.runtime import native\n"
            "try: native.compile_module(sys.argv[2])\n"
            "except Exception as e: print(native.failure(e)); sys.exit(1)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    done: dict[str, float | str] = {}
    while todo or running:
        while todo and len(running) < jobs:
            n = todo.pop(0)
            print(f"cpugen: building kernels/{n}.cpp for this machine and torch {torch.__version__} (once, about "
                  f"half a minute; {jobs} modules at a time; cached in {build_dir(n)})", file=sys.stderr)
            out = tempfile.TemporaryFile("w+")  # a file, not a pipe: a failed build's log cannot block it
            running[n] = (subprocess.Popen([sys.executable, "-c", code, root, n], env=env, stdout=out,
                                           stderr=subprocess.DEVNULL), time.perf_counter(), out)
        time.sleep(0.2)
        for n in [n for n, (c, _, _) in running.items() if c.poll() is not None]:
            c, t0, out = running.pop(n)
            out.seek(0)  # a killed child (out of memory, say) leaves no line: its exit status instead
            why = (out.read().strip().splitlines() or [f"its build process ended with status {c.returncode}"])[-1]
            out.close()
            done[n] = time.perf_counter() - t0 if is_built(n) else why
    return done


def build_all() -> dict[str, str]:
    """Builds (or finds built) every kernel module this CPU can run, several at once where the cores
    and the memory allow (compile_parallel): name -> what happened."""
    names = [n for n in (*PORTABLE, *X86, *MODULES) if can_run(n) is None]
    cached = {n: is_built(n) for n in names}
    took = compile_parallel(names)
    out = {}
    for name in (*PORTABLE, *X86, *MODULES):
        why = can_run(name)
        if why:
            out[name] = f"not for this CPU: {why}"
            continue
        if isinstance(took.get(name), str):  # its compiler failed: loading it would only fail again
            out[name] = f"unavailable: {took[name]}"
            continue
        t0 = time.perf_counter()
        ok = extension(name) is not None
        secs = took.get(name) or time.perf_counter() - t0
        out[name] = (("cached" if cached[name] else f"built in {secs:.0f} s") + f" ({build_dir(name)})"
                     if ok else f"unavailable: {why_not(name)}")
    return out


def _clear_stale_lock(lock: Path):
    """cpp_extension serializes builds with a lock file and waits forever while it exists; one left
    by a killed build would hang every later process."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            print(f"cpugen: removed a stale build lock {lock}", file=sys.stderr)
    except FileNotFoundError:
        pass


def pinner():
    """(the native function that pins ATen's workers to cores, or None, and why not): what
    host/placement.py's apply() takes as `pin`."""
    ext = extension("threads")
    return (ext.pin, None) if ext is not None else (None, why_not("threads"))
