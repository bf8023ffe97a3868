"""Backends: what runs cpugen's model. `eager` is PyTorch's own CPU path; `ipex` applies Intel
Extension for PyTorch (weight prepacking through `ipex.optimize`, its fused norm kernels);
`auto` takes ipex when it imports and eager otherwise."""

from __future__ import annotations

import torch

from cpugen.errors import CpugenError
from cpugen.model import Norm, Transformer

BACKENDS = ("auto", "eager", "ipex")
IPEX_HINT = ("install it in its own environment with `bash scripts/ipex_env.sh` (torch 2.8 + "
             "intel-extension-for-pytorch 2.8.0), then run cpugen from that environment")


def _import_ipex():
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as e:  # noqa: BLE001 - absent, or built for another torch
        return None, f"{type(e).__name__}: {e}".splitlines()[0]
    return ipex, None


def resolve(name: str) -> str:
    if name not in BACKENDS:
        raise CpugenError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if name == "eager":
        return "eager"
    ipex, why = _import_ipex()
    if ipex is None:
        if name == "ipex":
            raise CpugenError(f"--backend ipex needs intel-extension-for-pytorch ({why}): {IPEX_HINT}")
        return "eager"
    return "ipex"


def apply(model: Transformer, backend: str, dtype: torch.dtype) -> Transformer:
    """Prepares `model` in place for `backend` (already resolved); returns the module to call."""
    if backend == "eager":
        return model
    ipex, _ = _import_ipex()
    # inplace: the prepacked weights replace the originals, so the weights are never held twice
    model = ipex.optimize(model, dtype=dtype, inplace=True, weights_prepack=True, auto_kernel_selection=True)
    fused = ipex.llm.functional
    for m in model.modules():
        if isinstance(m, Norm):
            if m.kind == "layernorm":
                m.impl = lambda x, m=m: fused.fast_layer_norm(x, x.shape[-1:], m.weight, m.bias, m.eps)
            else:
                m.impl = lambda x, m=m: fused.rms_norm(x, m.weight, m.eps)
    return model
