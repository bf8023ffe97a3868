"""Tensor parallelism's arithmetic: which slice of each of the model's tensors a rank holds.

Megatron's split, for `world` ranks:
- attention by heads: rank r holds query heads [r nh/w, (r+1) nh/w) and the key/value heads they
  read. With at least as many kv heads as ranks, the kv heads are split the same way; with fewer
  (GQA), each kv head is held by the w/nkv ranks whose query heads it serves (replicated).
- the MLP by columns, then rows: fc_in's (or [gate; up]'s) output rows, fc_out's input columns.
- the lm_head by vocabulary rows: ceil(V/w) a rank, the last rank fewer.
- embeddings and norms whole on every rank.
- the row-parallel matmuls' biases (attention out, fc_out) on rank 0 only: the all-reduce that sums
  the ranks' partial outputs then adds each once.

A rank's model is the single-process model cut to these slices (`local_config` gives its shapes),
so random weights and checkpoints alike are read slice by slice (`rows`, `cols`) and never whole.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cpugen.errors import CpugenError
from cpugen.model.config import ModelConfig
from cpugen.model.shapes import n_params


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @property
    def whole(self) -> bool:
        return self.world == 1


def problem(cfg: ModelConfig, world: int) -> str | None:
    """Why `cfg` cannot be split over `world` ranks (with what would work), or None."""
    if world < 1:
        return f"--tp must be at least 1, not {world}"
    if world == 1:
        return None
    ok = [w for w in range(2, 65) if _fits(cfg, w)]
    what = f"--tp {' or '.join(map(str, ok[:6]))} would" if ok else "no --tp above 1 would"
    if cfg.n_head % world:
        return f"{cfg.name} has {cfg.n_head} attention heads, which {world} ranks cannot share evenly: {what} work"
    if cfg.intermediate_size % world:
        return (f"{cfg.name}'s MLP width {cfg.intermediate_size} does not divide among {world} ranks: "
                f"{what} work")
    if cfg.n_kv_head % world and world % cfg.n_kv_head:
        return (f"{cfg.name} has {cfg.n_kv_head} key/value heads, which {world} ranks can neither split nor "
                f"replicate evenly: {what} work")
    return None


def _fits(cfg: ModelConfig, world: int) -> bool:
    return (not cfg.n_head % world and not cfg.intermediate_size % world
            and (not cfg.n_kv_head % world or not world % cfg.n_kv_head))


def check(cfg: ModelConfig, world: int):
    why = problem(cfg, world)
    if why:
        raise CpugenError(why)


def kv_heads(cfg: ModelConfig, s: Shard) -> tuple[int, int]:
    """[first, last) of the kv heads rank s holds."""
    if cfg.n_kv_head >= s.world:
        n = cfg.n_kv_head // s.world
        return s.rank * n, (s.rank + 1) * n
    g = s.world // cfg.n_kv_head  # ranks sharing each kv head
    return s.rank // g, s.rank // g + 1


def vocab_rows(cfg: ModelConfig, s: Shard) -> tuple[int, int]:
    """[first, last) of the lm_head's vocabulary rows rank s holds."""
    per = -(-cfg.vocab_size // s.world)
    return min(cfg.vocab_size, s.rank * per), min(cfg.vocab_size, (s.rank + 1) * per)


def local_config(cfg: ModelConfig, s: Shard) -> ModelConfig:
    """The shapes of rank s's blocks: its heads and its share of the MLP (the vocabulary stays whole:
    the embedding is; the lm_head's rows are `vocab_rows`)."""
    if s.whole:
        return cfg
    k0, k1 = kv_heads(cfg, s)
    return replace(cfg, n_head=cfg.n_head // s.world, n_kv_head=k1 - k0,
                   intermediate_size=cfg.intermediate_size // s.world)


def rows(name: str, cfg: ModelConfig, s: Shard) -> list[tuple[int, int]] | None:
    """The row ranges of the full tensor `name` (a block's "attn.wqkv.weight", ..., or
    "lm_head.weight") that rank s holds, in order; None: every row."""
    if s.whole:
        return None
    hd, nh_l = cfg.head_dim, cfg.n_head // s.world
    q, kv = cfg.q_dim, cfg.kv_dim
    k0, k1 = kv_heads(cfg, s)
    ffn_l = cfg.intermediate_size // s.world
    f0 = s.rank * ffn_l
    if name.startswith("attn.wqkv."):
        mine_q = (s.rank * nh_l * hd, (s.rank + 1) * nh_l * hd)
        return [mine_q, (q + k0 * hd, q + k1 * hd), (q + kv + k0 * hd, q + kv + k1 * hd)]
    if name.startswith("mlp.w_in."):
        if cfg.mlp == "glu":  # [gate; up]
            return [(f0, f0 + ffn_l), (cfg.intermediate_size + f0, cfg.intermediate_size + f0 + ffn_l)]
        return [(f0, f0 + ffn_l)]
    if name.startswith("lm_head."):
        return [vocab_rows(cfg, s)]
    return None


def cols(name: str, cfg: ModelConfig, s: Shard) -> tuple[int, int] | None:
    """The column range of the full matrix `name` that rank s holds; None: every column."""
    if s.whole:
        return None
    if name == "attn.wo.weight":
        w = cfg.q_dim // s.world
        return s.rank * w, (s.rank + 1) * w
    if name == "mlp.w_out.weight":
        w = cfg.intermediate_size // s.world
        return s.rank * w, (s.rank + 1) * w
    return None


ROW_PARALLEL_BIASES = ("attn.wo.bias", "mlp.w_out.bias")  # added once: on rank 0


def n_params_of_rank(cfg: ModelConfig, s: Shard) -> int:
    """The parameters rank s holds (its slices, the replicated parts whole; a tied lm_head is a view
    of the embedding and counts once): what its weights take in memory."""
    if s.whole:
        return n_params(cfg)
    local = local_config(cfg, s)
    v0, v1 = vocab_rows(cfg, s)
    head_rows_not_held = cfg.vocab_size - (v1 - v0)
    n = n_params(local)
    if not cfg.tie_embeddings:
        n -= head_rows_not_held * cfg.n_embd
    if cfg.lm_head_bias:
        n -= head_rows_not_held
    return n
