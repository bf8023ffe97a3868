"""Materializing a model: random weights (the reference's throughput mode) or a checkpoint.

Random weights are deterministic from the seed and written straight into the final dtype, block by
block: no whole-model fp32 copy ever exists. Drawing a normal sample for each of ~1.4e9 parameters
costs ~20 s on 2 cores, so each tensor is filled instead from a seeded pool of normal samples at a
random offset: a copy at memory speed, every byte written (so memory and bandwidth figures are
real). The pool length is prime, so no two rows of a matrix start at the same place in it.

Scale: input projections get std 1/sqrt(fan_in), output projections (attention out, MLP out)
1/sqrt(2 L fan_in), norms 1 and biases 0: each block adds O(1/L) variance to the residual stream,
so activations stay finite through 96 layers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from cpugen.model import shard
from cpugen.model import transformer as M
from cpugen.model.shard import Shard
from cpugen.model.config import ModelConfig
from cpugen.host.memory import empty_huge
from cpugen.progress import Progress

POOL = 4_194_301  # prime


class _Pool:
    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.samples = torch.randn(POOL, generator=self.gen)  # fp32, N(0, 1)
        self.dtype = dtype
        self._scaled: dict[float, torch.Tensor] = {}

    def scaled(self, std: float) -> torch.Tensor:
        if std not in self._scaled:
            self._scaled[std] = (self.samples * std).to(self.dtype)
        return self._scaled[std]

    def fill_(self, t: torch.Tensor, std: float, full_shape: tuple[int, int] | None = None,
              rows: list[tuple[int, int]] | None = None, cols: tuple[int, int] | None = None):
        """Fills t with the tensor of `full_shape` (default t's) that the pool gives at the next
        random offset, element j of it being pool[(offset + j) mod POOL]; or, given `rows` ranges
        and a `cols` range, with just that slice of it (a tensor-parallel rank's share), which is
        then exactly those elements of the single-process tensor."""
        src = self.scaled(std)
        cursor = int(torch.randint(POOL, (1,), generator=self.gen))  # drawn the same way for a slice
        if rows is None and cols is None:
            _copy_from(t.view(-1), src, cursor)
            return
        n, k = full_shape if len(full_shape) == 2 else (full_shape[0], 1)
        c0, c1 = cols or (0, k)
        out = t.view(-1, c1 - c0)  # (rows held, cols held)
        i = 0
        for r0, r1 in rows or [(0, n)]:
            if (c0, c1) == (0, k):  # whole rows: one run of the flat tensor
                _copy_from(out[i:i + r1 - r0].view(-1), src, (cursor + r0 * k) % POOL)
            else:
                for r in range(r0, r1):
                    _copy_from(out[i + r - r0], src, (cursor + r * k + c0) % POOL)
            i += r1 - r0


def _copy_from(flat: torch.Tensor, src: torch.Tensor, cursor: int):
    """flat[j] = src[(cursor + j) mod len(src)]."""
    n, i = flat.numel(), 0
    while i < n:
        k = min(n - i, POOL - cursor)
        flat[i:i + k].copy_(src[cursor:cursor + k])
        i, cursor = i + k, 0


def _init_block(block: M.Block, full: M.Block, cfg: ModelConfig, pool: _Pool, s: Shard):
    """`full`: the same block unsplit (on the meta device), whose shapes set the scales and the
    slices rank s's tensors are cut from."""
    out_std = 1.0 / math.sqrt(2 * cfg.n_layer)
    shapes = {name: p.shape for name, p in full.named_parameters()}
    for name, p in block.named_parameters():
        if name.endswith("bias") or "ln_" in name:
            p.fill_(1.0 if ("ln_" in name and name.endswith("weight")) else 0.0)
        else:
            fan_in = shapes[name][1]
            std = (out_std if name in ("attn.wo.weight", "mlp.w_out.weight") else 1.0) / math.sqrt(fan_in)
            pool.fill_(p, std, tuple(shapes[name]), shard.rows(name, cfg, s), shard.cols(name, cfg, s))


def random_model(cfg: ModelConfig, dtype: torch.dtype, seed: int, progress: Progress | None = None,
                 s: Shard = Shard()):
    """A model with deterministic random weights, materialized one block at a time; for a
    tensor-parallel rank (`s`), only its slices, each equal to that slice of the single-process
    model's tensor (so a split run computes what the single process does)."""
    model = M.build(shard.local_config(cfg, s), dtype, vocab_rows=None if s.whole else shard.vocab_rows(cfg, s))
    full = model if s.whole else M.build(cfg, dtype)  # meta: the unsplit shapes, nothing allocated
    pool = _Pool(seed, dtype)
    _materialize(model.wte)
    pool.fill_(model.wte.weight, 1.0)
    if model.wpe is not None:
        _materialize(model.wpe)
        pool.fill_(model.wpe.weight, 1.0)
    for i, (block, whole) in enumerate(zip(model.blocks, full.blocks)):
        _materialize(block)
        _init_block(block, whole, cfg, pool, s)
        if progress:
            progress.update(i + 1, len(model.blocks))
    _materialize(model.ln_f)
    model.ln_f.weight.fill_(1.0)
    if model.ln_f.bias is not None:
        model.ln_f.bias.zero_()
    if cfg.tie_embeddings:
        model.tie_weights()
    else:
        model.lm_head.weight = torch.nn.Parameter(empty_huge(model.lm_head.weight.shape, dtype), requires_grad=False)
        pool.fill_(model.lm_head.weight, 1.0 / math.sqrt(cfg.n_embd), (cfg.vocab_size, cfg.n_embd),
                   shard.rows("lm_head.weight", cfg, s))
    if model.lm_head.bias is not None:
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features, dtype=dtype),
                                                requires_grad=False)
    return model


def _materialize(module: torch.nn.Module):
    """meta -> uninitialized CPU storage, in place (the caller writes every element), each
    parameter on huge pages from a 2 MiB boundary where the kernel gives them (memory.empty_huge)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(empty_huge(p.shape, p.dtype), requires_grad=p.requires_grad))


def load_model(cfg: ModelConfig, checkpoint: Path | None, dtype: torch.dtype, seed: int,
               progress: Progress | None = None, s: Shard = Shard()):
    if checkpoint is None:
        return random_model(cfg, dtype, seed, progress, s)
    from cpugen.model.checkpoint import load_checkpoint

    return load_checkpoint(cfg, checkpoint, dtype, progress, s)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all distinct parameters (a tied lm_head counts once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for m in model.modules():  # weights a backend moved out of the parameters (a packed layout)
        for packed in (getattr(m, "packed", None), getattr(m, "panels", None), getattr(m, "onednn", None)):
            if packed is not None:
                total += packed.numel() * packed.element_size()
    return total
