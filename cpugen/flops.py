"""FLOP and byte counts behind the reported figures (the reference page's formulas, generalized).

For L layers, hidden h, attention width a = n_head x head_dim, prompt length s, and P_layer the
matmul parameters of one block (q/k/v/out projections and the MLP's matrices):
- prompt FLOPs per sequence  = L (2 s P_layer + 4 s^2 a) + 2 h V
  (2 FLOPs per parameter per token; QK^T and AV each 2 s^2 a, counted in full like the reference;
  the lm_head runs for the last position only). For dense GPT-J blocks P_layer = 12 h^2, which
  gives the reference's L (24 s h^2 + 4 s^2 h): 361.19 TFLOP at s=1024 for GPT-175B.
- FLOPs per generated token at context c = L (2 P_layer + 4 c a) + 2 h V  (~2 x parameters:
  0.35 TFLOP for GPT-175B).
"""

from __future__ import annotations

from cpugen.config import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    h, ffn = cfg.n_embd, cfg.intermediate_size
    attn = h * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * h
    mlp = (3 if cfg.mlp == "glu" else 2) * h * ffn
    return attn + mlp


def n_params(cfg: ModelConfig) -> int:
    """Every parameter, a tied lm_head once (the count weight bytes are made of)."""
    h, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    norm = h * (2 if cfg.norm == "layernorm" else 1)
    bias = ((cfg.q_dim + 2 * cfg.kv_dim) if cfg.qkv_bias else 0) + (h if cfg.out_bias else 0)
    if cfg.mlp_bias:
        bias += (2 if cfg.mlp == "glu" else 1) * cfg.intermediate_size + h
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


def prompt_flops(cfg: ModelConfig, s: int) -> float:
    """FLOPs of the prompt pass for one sequence of s tokens."""
    L, a = cfg.n_layer, cfg.q_dim
    return L * (2 * s * layer_matmul_params(cfg) + 4 * s * s * a) + 2 * cfg.n_embd * cfg.vocab_size


def token_flops(cfg: ModelConfig, context: float) -> float:
    """FLOPs to generate one token for one sequence that attends `context` positions."""
    L, a = cfg.n_layer, cfg.q_dim
    return L * (2 * layer_matmul_params(cfg) + 4 * context * a) + 2 * cfg.n_embd * cfg.vocab_size


def mean_token_flops(cfg: ModelConfig, prompt_len: int, gen_len: int) -> float:
    """token_flops averaged over the decode steps of a run (contexts prompt_len+1 .. prompt_len+gen_len-1)."""
    steps = max(gen_len - 1, 1)
    mean_ctx = prompt_len + 1 + (steps - 1) / 2
    return token_flops(cfg, mean_ctx)
