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

from cpugen.model.config import ModelConfig
from cpugen.model.shapes import layer_matmul_params


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
