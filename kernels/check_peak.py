#!/usr/bin/env python3
"""Checks kernels/peak.cpp, the roofline's register-only compute limits: at every ISA level this CPU
has, each thread's chains end at the exact value their arithmetic gives (iters x y x lanes x chains:
no instruction skipped, none folded away), a level the CPU lacks is refused, and the measured rate
is at least what PyTorch's fp32 GEMM reaches on the same threads, and with AMX the tile limit at
least what its bf16 GEMM (oneDNN's, on the tiles) reaches (a library cannot beat the hardware it runs
on; 10% is left for the noise of a shared host); and that its read of several streams a thread
(the roofline's bandwidth beside torch's reductions) adds up every byte once.

    python kernels/check_peak.py      # exits non-zero on a mismatch, or where the kernel is unavailable
Used by cpugen/perf/roofline.py (`python -m cpugen roofline`); tests/test_roofline.py runs this."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cpugen.perf import roofline  # noqa: E402
from cpugen.host.cpu import cpu_info  # noqa: E402
from cpugen.runtime.native import extension, why_not  # noqa: E402

LANES = roofline.LANES


def check_sums(ext) -> list[str]:
    """Each level's checksums against the arithmetic, at two thread counts and two addends."""
    done = []
    for level in roofline.levels():
        for threads in (1, torch.get_num_threads()):
            for iters, y in ((1000, 1.0), (4096, 0.5)):
                sums = ext.run(level, iters, threads, 1.0, y)
                want = iters * y * LANES[level] * ext.chains(level)
                if sums != [want] * threads:
                    raise AssertionError(f"{level}, {threads} threads, y={y}: checksums {sums}, expected {want} each")
                done.append(f"{level} x{threads} y={y}")
    for level in set(LANES) - set(roofline.levels()):  # above this CPU: refused, never run
        try:
            ext.run(level, 10, 1, 1.0, 1.0)
        except RuntimeError as e:
            if "lacks" not in str(e):
                raise
        else:
            raise AssertionError(f"{level} ran on a CPU without it")
    return done


def check_read(ext) -> int:
    """The native read's sum of bytes against torch's, over lengths that leave a tail at every stream
    and thread count (nothing read twice, nothing skipped); returns the cases checked."""
    gen = torch.Generator().manual_seed(0)
    cases = 0
    for n in (0, 1, 63, 64, 4097, 1 << 20, (1 << 20) + 12345):
        b = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        want = int(b.sum(dtype=torch.int64))
        for streams in (1, 3, *roofline.READ_STREAMS):
            for threads in (1, 2, 3):
                got = ext.read(b, streams, threads)
                if got != want:
                    raise AssertionError(f"read of {n} bytes, {streams} streams, {threads} threads: sum {got}, "
                                         f"expected {want}")
                cases += 1
    return cases


def gemm_tflops(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e12)
    return best


def check_rate(tries: int = 3) -> tuple[float, float]:
    """(the FMA limit of the widest fp32 level, torch.mm's fp32 rate); raises where torch beats it in
    each of `tries` measurements of both, a second apart: a neighbour on a shared host can slow the
    chains' short runs for a moment (seen in CI: chains 0.152 TFLOP/s, torch.mm 0.178, where the
    chains read 0.205 on a quiet host), chains that do not measure the hardware stay below every time."""
    threads = torch.get_num_threads()
    seen = []
    for i in range(tries):
        if i:
            time.sleep(1.0)
        hw = roofline.measure_hw(threads)
        fma = hw["avx512"] if "avx512" in hw else hw["avx2"]
        mm = gemm_tflops()
        # with AMX, oneDNN's bf16 matmul runs on the tiles: it must stay under their limit too
        amx, mm16 = (hw["amx"], gemm_tflops(4096, dtype=torch.bfloat16)) if "amx" in hw else (1.0, 0.0)
        if mm <= 1.1 * fma and mm16 <= 1.1 * amx:
            return fma, mm
        seen.append(f"{mm:.3f} against {fma:.3f}" + (f", bf16 {mm16:.3f} against AMX {amx:.3f}" if mm16 else ""))
    raise AssertionError(f"torch.mm beat the register-only limit on {threads} threads by more than 10% in "
                         f"each of {tries} tries ({', '.join(seen)} TFLOP/s): the chains do not measure the hardware")


if __name__ == "__main__":
    ext = extension("peak")
    if ext is None:
        sys.exit(f"kernels/peak.cpp unavailable: {why_not('peak')}")
    print(f"checksums exact: {', '.join(check_sums(ext))}")
    if cpu_info()["avx2"]:
        print(f"read: the sum of the bytes exact in {check_read(ext)} cases")
    fma, mm = check_rate()
    print(f"fp32 FMA limit {fma:.3f} TFLOP/s; torch.mm fp32 {mm:.3f} ({mm / fma:.0%} of it)")
