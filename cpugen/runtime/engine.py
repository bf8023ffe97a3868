"""The generate loop: prefill, then decode_one_token step by step, over a static KV cache.

Prompts of different lengths are left-padded so that every sequence's next token is written at
the same cache index; padding keys are masked out and each sequence's positions count only its
own tokens, so a prompt's output does not depend on the other prompts in its batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cpugen.errors import CpugenError
from cpugen.model.transformer import Transformer
from cpugen.runtime.sampling import Sampling, sample


@dataclass
class Prompts:
    tokens: torch.Tensor  # (B, T) int64, left-padded
    valid: torch.Tensor  # (B, T) bool, False on padding

    @classmethod
    def left_pad(cls, prompts: list[list[int]], pad_id: int = 0) -> "Prompts":
        if not prompts or any(len(p) == 0 for p in prompts):
            raise CpugenError("every prompt needs at least one token")
        T = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
        valid = torch.zeros((len(prompts), T), dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, T - len(p):] = True
        return cls(tokens, valid)

    @property
    def padded(self) -> bool:
        return not bool(self.valid.all())


def compute_context(dtype: torch.dtype):
    """No autograd; bf16 autocast for bf16 weights (norms and softmax stay fp32 inside the model)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16))
    return stack


class Engine:
    """Holds the cache state of one batch: call prefill once, then decode_one_token."""

    def __init__(self, model: Transformer, batch: int, max_len: int, dtype: torch.dtype,
                 forward=None, prefill_chunk: int | None = None, prefill_micro_batch: int | None = None):
        cfg = model.cfg
        if max_len > cfg.max_positions:
            raise CpugenError(f"prompt + generation is {max_len} tokens but {cfg.name} has "
                              f"{cfg.max_positions} positions: shorten the prompt or generate fewer tokens")
        self.model, self.cfg, self.batch, self.max_len = model, cfg, batch, max_len
        self.forward = forward or model  # a backend may wrap the module's forward
        self.prefill_chunk = prefill_chunk  # bounded prefill scratch: chunks of the prompt ...
        self.prefill_micro_batch = prefill_micro_batch  # ... and groups of sequences at a time
        self.dtype = dtype
        model.setup_caches(batch, max_len, dtype)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool)  # (B, S_max)
        self.next_index = 0  # cache index the next token is written to (same for every row)
        self.next_pos = torch.zeros(batch, dtype=torch.long)  # (B,) position id of each row's next token
        self.padded = False

    def reset(self):
        """Forget the cached sequences (the cache memory stays allocated for the next batch)."""
        self.key_valid.zero_()
        self.next_index, self.padded = 0, False
        self.next_pos = torch.zeros(self.batch, dtype=torch.long)

    def _mask(self, start: int, T: int, rows: slice = slice(None)):
        """(b, 1, T, start+T) bool, or None where plain causal (prefill) / everything (decode) is right."""
        S = start + T
        window = self.cfg.sliding_window
        windowed = window is not None and S > window
        if not self.padded and not windowed and (start == 0 or T == 1):
            return None
        q = torch.arange(start, S)[:, None]  # (T, 1) cache index of each query
        k = torch.arange(S)[None, :]  # (1, S)
        allowed = (k <= q) & self.key_valid[rows, None, None, :S]  # (b, 1, T, S)
        if windowed:
            allowed &= k > q - window
        return allowed | (k == q)  # a padding query attends to itself: no empty row, no NaN

    def prefill(self, prompts: Prompts) -> torch.Tensor:
        """Runs the prompts through the model; returns the last position's logits (B, V)."""
        B, T = prompts.tokens.shape
        if B != self.batch:
            raise CpugenError(f"engine was set up for batch {self.batch}, got {B} prompts")
        if T >= self.max_len:
            raise CpugenError(f"prompt of {T} tokens leaves no room to generate in a cache of {self.max_len}")
        _check_ids(prompts.tokens, self.cfg.vocab_size)
        self.padded = prompts.padded
        self.key_valid[:, :T] = prompts.valid
        self.key_valid[:, T:] = True  # generated positions: causality keeps each out until it is written
        pos = (prompts.valid.cumsum(1) - 1).clamp(min=0)  # (B, T) each row counts its own tokens
        chunk = self.prefill_chunk or T
        micro = self.prefill_micro_batch or B
        parts = []
        for r in range(0, B, micro):
            rows = slice(r, min(B, r + micro))
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                logits = self.forward(prompts.tokens[rows, s:e], pos[rows, s:e], self._mask(s, e - s, rows), s,
                                      e == T, rows)
            parts.append(logits)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.next_index = T
        self.next_pos = prompts.valid.sum(1)
        return logits

    def decode_one_token(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> logits (B, V) for the position after it."""
        if self.next_index >= self.max_len:
            raise CpugenError(f"the KV cache of {self.max_len} positions is full")
        i = self.next_index
        logits = self.forward(token[:, None], self.next_pos[:, None], self._mask(i, 1), i, True)
        self.next_index += 1
        self.next_pos = self.next_pos + 1
        return logits


def _check_ids(tokens: torch.Tensor, vocab: int):
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab else int(tokens.min())
        raise CpugenError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
             dtype: torch.dtype, stop_ids: list[int] = (), ignore_eos: bool = False, forward=None,
             on_token=None, prefill_chunk: int | None = None,
             prefill_micro_batch: int | None = None) -> list[list[int]]:
    """Generates up to max_new_tokens for each prompt; returns the new ids of each sequence.

    A sequence stops after emitting one of stop_ids (which is kept in its output), unless
    ignore_eos; the loop ends when every sequence has stopped."""
    if max_new_tokens < 1:
        raise CpugenError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
    batch = Prompts.left_pad(prompts, model.cfg.pad_token_id or 0)
    B, T = batch.tokens.shape
    engine = Engine(model, B, T + max_new_tokens, dtype, forward, prefill_chunk, prefill_micro_batch)
    gen = sampling.generator()
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    try:
        with compute_context(dtype):
            logits = engine.prefill(batch)
            for step in range(max_new_tokens):
                tok = sample(logits, sampling, gen)  # (B,)
                if model.same_tokens is not None and not sampling.greedy:  # split: one draw, rank 0's
                    tok = model.same_tokens(tok)
                for b, (t, d) in enumerate(zip(tok.tolist(), done.tolist())):
                    if not d:
                        out[b].append(t)
                if not ignore_eos and len(stop):
                    done |= torch.isin(tok, stop)
                if on_token:
                    on_token(step + 1, max_new_tokens)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                logits = engine.decode_one_token(tok)
    finally:
        model.free_caches()
    return out
