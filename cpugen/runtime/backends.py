"""Which backend runs cpugen's model, and applying it.

- `eager`: PyTorch's own CPU path with cpugen's native kernels installed (eager.py);
- `ipex`: Intel Extension for PyTorch (ipex.py);
- `auto`: the fastest available: for bf16 on a CPU with AVX-512 where the native kernels build,
  eager (it decoded 1.6-1.9x faster than ipex with AVX512-BF16: docs/performance.md, "Backends:
  eager against ipex"; and 1.2-1.7x HF + IPEX at either AVX-512 level, "By ISA level"); otherwise
  ipex where it imports and can run bf16 here, else eager.
"""

from __future__ import annotations

import torch

from cpugen.errors import CpugenError
from cpugen.model.transformer import Transformer
from cpugen.runtime import eager
from cpugen.runtime import ipex as ipex_backend

BACKENDS = ("auto", "eager", "ipex")


def resolve(name: str, dtype: str = "bfloat16") -> str:
    """`--backend` as given -> the backend that will run: eager or ipex."""
    if name not in BACKENDS:
        raise CpugenError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "eager":
        return "eager"
    if name == "auto" and dtype == "bfloat16" and eager.available(build=False):
        return "eager"
    ipex, why = ipex_backend.import_ipex()
    if ipex is None:
        if name == "ipex":
            raise CpugenError(f"--backend ipex needs intel-extension-for-pytorch ({why}): {ipex_backend.HINT}")
        return "eager"
    if name == "auto" and dtype == "bfloat16" and not ipex_backend.bf16_ok(ipex):
        return "eager"
    return "ipex"


def apply(model: Transformer, backend: str, dtype: torch.dtype) -> Transformer:
    """Prepares `model` in place for `backend` (already resolved); returns the module to call."""
    if backend == "eager":
        if dtype == torch.bfloat16:
            eager.prepare(model)
        return model
    return ipex_backend.apply(model, dtype)
