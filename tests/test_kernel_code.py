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

pytestmark = pytest.mark.skipif(not cpu_info()["avx512"], reason="the packed kernel's AVX-512 module "
                                "builds where the CPU has AVX-512")


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


@pytest.mark.parametrize("module", ["gemv_bf16", "decode_layer"])
def test_packed_micro_kernels_carry_their_prefetches(module):
    """Every panel micro-kernel, at both AVX-512 levels and every row count, in the module and in the
    decode stack that includes it: W's next chunk (non-temporal hints) and the output lines a
    finishing call writes (T0)."""
    ext = native.extension(module)
    assert ext is not None, f"cpugen's {module} module did not build on this AVX-512 CPU"
    micros = {name: code for name, code in disassembly(ext.__file__).items()
              if re.search(r"::panel_micro(_f32)?<\d>\(", name)}
    assert len(micros) == 12, sorted(micros)  # 6 row counts x 2 levels
    for name, code in micros.items():
        for hint in ("prefetchnta", "prefetcht0"):
            assert hint in code, f"{name} has no {hint}"
