"""Choosing the next token from logits: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpugen.errors import CpugenError
from cpugen.runtime import native


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise CpugenError(f"--temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise CpugenError(f"--top-k must be >= 0, not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise CpugenError(f"--top-p must be in (0, 1], not {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> (B,) int64: greedy decoding's choice, torch.argmax's answer (first maximum,
    first NaN), through kernels/argmax.h where it builds (7 against 180 us a row of 50400 logits on
    a Zen 4 core), at the CPU's level (AVX-512 or AVX2), torch.argmax otherwise or with CPUGEN_NATIVE=0."""
    ext = native.step_kernels()
    if ext is None or logits.dim() != 2 or logits.dtype not in (torch.bfloat16, torch.float32):
        return logits.argmax(dim=-1)
    return ext.argmax(logits)


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if s.greedy:
        return argmax(logits)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
