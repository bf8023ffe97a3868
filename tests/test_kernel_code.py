"""The built kernels hold the instructions their source asks for, read back from the module by
objdump (binutils, which the kernels' build needs anyway). A compiler may drop a prefetch it
judges free of side effects: GCC 12 removed the calls of a plain inline helper before inlining them
into the packed kernel's AVX-512 micro-kernels, which then ran with no prefetch at all while every
result stayed right. Only the machine code shows it."""

import re
import subprocess

import pytest

from cpugen.host.cpu import cpu_info
from cpugen.runtime import native

avx512 = pytest.mark.skipif(not cpu_info()["avx512"], reason="the packed kernel's AVX-512 module builds where "
                            "the CPU has AVX-512")
avx2 = pytest.mark.skipif(not cpu_info()["avx2"], reason="the AVX2 module builds where the CPU has AVX2 and FMA")


def disassembly(path: str) -> dict[str, str]:
    """Each function of the shared object at `path`, demangled: its name -> its instructions."""
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True,
                         check=True).stdout
    funcs, name = {}, None
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            funcs[name] = ""
        elif name is not None:
            funcs[name] += line + "\n"
    return funcs


def instructions(code: str) -> list[tuple[int, str, str]]:
    """A function's disassembly as (address, mnemonic, operands)."""
    out = []
    for line in code.splitlines():
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def innermost_fma_loop(code: str) -> list[tuple[int, str, str]]:
    """The instructions of the smallest loop (a backward jump's span) that holds an FMA."""
    ins, loops = instructions(code), []
    for addr, op, args in ins:
        back = re.match(r"([0-9a-f]+) <", args) if op.startswith("j") else None
        if back and int(back.group(1), 16) < addr:
            body = [i for i in ins if int(back.group(1), 16) <= i[0] <= addr]
            if any(i[1].startswith("vfmadd") for i in body):
                loops.append(body)
    assert loops, "no loop with an FMA"
    return min(loops, key=len)


@avx512
@pytest.mark.parametrize("module", ["gemv_bf16", "decode_layer"])
def test_packed_micro_kernels_carry_their_prefetches(module):
    """Every panel micro-kernel, at both AVX-512 levels and every row count, in the module and in the
    decode stack that includes it: W's next chunk (T1) and the output lines a finishing call writes
    (T0)."""
    ext = native.extension(module)
    assert ext is not None, f"cpugen's {module} module did not build on this AVX-512 CPU"
    micros = {name: code for name, code in disassembly(ext.__file__).items()
              if re.search(r"::panel_micro(_f32)?<\d>\(", name)}
    assert len(micros) == 12, sorted(micros)  # 6 row counts x 2 levels
    for name, code in micros.items():
        for hint in ("prefetcht1", "prefetcht0"):
            assert hint in code, f"{name} has no {hint}"
    # prefill's 12-row kernel (kWideRows rows and more, both levels' FMA path): its assembly loop
    # prefetches W's next chunk and keeps its 24 sums in registers (GCC's 6-row loop spills 3 a k pair)
    (half,) = [code for name, code in disassembly(ext.__file__).items() if "::half_micro12(" in name]
    loop = innermost_fma_loop(half)
    assert any(op == "prefetcht1" for _, op, _ in loop), "half_micro12 prefetches nothing in its loop"
    assert sum(op == "vfmadd231ps" for _, op, _ in loop) == 48, "half_micro12's loop: 12 rows x 2 vectors x 2 k"
    spills = [f"{op} {args}" for _, op, args in loop if re.search(r"\(%rsp\)", args)]
    assert not spills, f"half_micro12 touches the stack in its k pair loop: {spills}"


@avx2
@pytest.mark.parametrize("module", ["avx2", "decode_layer"])
def test_avx2_micro_kernels_keep_their_sums_in_registers(module):
    """The AVX2 packed kernel's micro-kernels (1-6 rows of x, each prefetching a line every 1, 2 or 4
    k pairs) in the module and in the decode stack: each prefetches the next chunk (T1), and its loop
    over the k pairs stores no ymm register to the stack. With one more value carried through that
    loop (a counter for the spread prefetch), GCC 12 spilled 4-8 of the sums to the stack every k
    pair, and gptj-1b's batch-32 decode step on 2 Zen 3 cores ran slower than before the spread
    instead of faster; the 6-row loop's assembly, given its sums as an array, had GCC store all 12
    to the stack every k pair (0.65-0.88x the 5-row kernel)."""
    ext = native.extension(module)
    assert ext is not None, f"cpugen's {module} module did not build on this AVX2 CPU"
    micros = {name: code for name, code in disassembly(ext.__file__).items()
              if re.search(r"cpugen_packed_avx2::.*::micro<\d, \d+l>\(", name)}
    assert len(micros) == 18, sorted(micros)  # 6 row counts x (a line every 1, 2, 4 k pairs)
    for name, code in micros.items():
        assert "prefetcht1" in code, f"{name} has no prefetcht1"
        spills = [f"{op} {args}" for _, op, args in innermost_fma_loop(code)
                  if op.startswith("vmov") and re.match(r"%ymm\d+,.*\(%rsp\)", args)]
        assert not spills, f"{name} stores sums to the stack in its k pair loop: {spills}"
