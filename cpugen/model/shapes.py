"""The matrix shapes of a model, derived once from its config: the transformer builds its Linear
layers from them, and the FLOP counts, the parameter count and the planner's memory model read them.

A block holds four matrices, (out, in) like nn.Linear's weight:
- wqkv: (q_dim + 2 kv_dim, h)   q, k and v fused
- wo:   (h, q_dim)
- w_in: (ffn, h), or (2 ffn, h) for a GLU MLP ([gate; up] fused)
- w_out: (h, ffn)
and the model one more, the lm_head (V, h), shared with the embedding where the config ties them.
"""

from __future__ import annotations

from cpugen.model.config import ModelConfig


def block_matrices(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """name -> (out_features, in_features) of one block's matrices."""
    h, ffn = cfg.n_embd, cfg.intermediate_size
    return {"wqkv": (cfg.q_dim + 2 * cfg.kv_dim, h), "wo": (h, cfg.q_dim),
            "w_in": ((2 if cfg.mlp == "glu" else 1) * ffn, h), "w_out": (h, ffn)}


def layer_matmul_params(cfg: ModelConfig) -> int:
    """P_layer: the matmul parameters of one block."""
    return sum(o * i for o, i in block_matrices(cfg).values())


def largest_matrix(cfg: ModelConfig) -> int:
    """Elements of the largest weight matrix a backend repacks (a tied lm_head is the embedding's
    and is never repacked)."""
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd
    return max(head, *(o * i for o, i in block_matrices(cfg).values()))


def n_params(cfg: ModelConfig) -> int:
    """Every parameter, a tied lm_head once (the count weight bytes are made of)."""
    h, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    mats = block_matrices(cfg)
    norm = h * (2 if cfg.norm == "layernorm" else 1)
    bias = (mats["wqkv"][0] if cfg.qkv_bias else 0) + (h if cfg.out_bias else 0)
    if cfg.mlp_bias:
        bias += mats["w_in"][0] + h
    block = layer_matmul_params(cfg) + bias + norm * (1 if cfg.parallel_residual else 2)
    embed = V * h + ((cfg.max_positions + cfg.position_offset) * h if cfg.position == "learned" else 0)
    head = (0 if cfg.tie_embeddings else V * h) + (V if cfg.lm_head_bias else 0)
    return embed + L * block + norm + head


def streamed_params(cfg: ModelConfig) -> int:
    """Parameters read in full by every decode step: all but the embedding tables, of which a step
    reads only one row per sequence (a tied embedding is read in full as the lm_head)."""
    n = n_params(cfg) - cfg.vocab_size * cfg.n_embd * (0 if cfg.tie_embeddings else 1)
    if cfg.position == "learned":
        n -= (cfg.max_positions + cfg.position_offset) * cfg.n_embd
    return n
