"""FLOP and parameter counts against independent sources: the reference page's figures,
transformers' own models (built on the meta device) and torch's FLOP counter."""

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from cpugen.model import shapes
from cpugen.perf import flops
from cpugen.model.config import from_name
from cpugen.runtime.engine import Engine, Prompts, compute_context
from cpugen.model.weights import random_model


def test_reference_figures_for_gpt_175b():
    cfg = from_name("gptj-175b")
    # the reference page: 361.19 TFLOP per sequence's prompt at 1024, 179.36 at 512, ~0.35 per token
    assert flops.prompt_flops(cfg, 1024) / 1e12 == pytest.approx(361.19, abs=0.005)
    assert flops.prompt_flops(cfg, 512) / 1e12 == pytest.approx(179.36, abs=0.005)
    assert flops.mean_token_flops(cfg, 1024, 100) / 1e12 == pytest.approx(0.35, abs=0.005)
    assert shapes.n_params(cfg) == pytest.approx(174e9, rel=0.01)  # "~174e9 params" (origin notes)


HF = {
    "gptj-6b": lambda: transformers.GPTJConfig(n_embd=4096, n_head=16, n_layer=28, rotary_dim=64,
                                               vocab_size=50400, n_positions=2048),
    "opt-1.3b": lambda: transformers.OPTConfig(hidden_size=2048, num_attention_heads=32, num_hidden_layers=24,
                                               ffn_dim=8192, word_embed_proj_dim=2048, vocab_size=50272,
                                               max_position_embeddings=2048),
    "llama-2-7b": lambda: transformers.LlamaConfig(),
    "llama-3-8b": lambda: transformers.LlamaConfig(vocab_size=128256, intermediate_size=14336,
                                                   num_key_value_heads=8, max_position_embeddings=8192),
    "mistral-7b": lambda: transformers.MistralConfig(),
}


@pytest.mark.parametrize("preset", sorted(HF))
def test_parameter_count_matches_transformers(preset):
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(HF[preset]())
    # transformers counts a tied lm_head once, like cpugen
    assert shapes.n_params(from_name(preset)) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("preset", ["tiny-gptj", "opt-125m", "llama-2-7b"])
def test_matmul_flops_match_torch_flop_counter(preset):
    # a narrow version of the preset: torch's counter sees every matmul; the attention terms are
    # counted separately (it does not count CPU SDPA kernels), so compare the matmul part exactly
    cfg = from_name(preset)
    import dataclasses
    cfg = dataclasses.replace(cfg, n_layer=2, n_embd=64, n_head=4, n_kv_head=2 if cfg.family == "llama" else 4,
                              head_dim=16, intermediate_size=96, vocab_size=128, max_positions=64,
                              rotary_dim=16 if cfg.family == "llama" else cfg.rotary_dim and 8)
    model = random_model(cfg, torch.float32, 0)
    s = 20
    engine = Engine(model, 1, s + 4, torch.float32)
    attn = lambda q_len, ctx: 4 * q_len * ctx * cfg.q_dim * cfg.n_layer  # noqa: E731
    with compute_context(torch.float32):
        with FlopCounterMode(display=False) as fc:
            logits = engine.prefill(Prompts(torch.arange(s)[None], torch.ones(1, s, dtype=torch.bool)))
        assert fc.get_total_flops() == flops.prompt_flops(cfg, s) - attn(s, s)
        with FlopCounterMode(display=False) as fc:
            engine.decode_one_token(logits.argmax(-1))
        assert fc.get_total_flops() == flops.token_flops(cfg, s + 1) - attn(1, s + 1)
