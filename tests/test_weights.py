"""Random weights: deterministic, fully materialized in the target dtype, finite through depth."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import torch

from cpugen.model.config import from_name
from cpugen.runtime.engine import Engine, Prompts, compute_context
from cpugen.model.weights import random_model, weight_bytes
from helpers import ROOT


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = from_name("tiny-gptj")
    a, b, c = (random_model(cfg, torch.bfloat16, s) for s in (7, 7, 8))
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.wqkv.weight"], sc["blocks.0.attn.wqkv.weight"])
    for k, v in sa.items():
        assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all(), k


def test_matrix_rows_differ_and_scale_follows_fan_in():
    cfg = from_name("gptj-1b").with_layers(1)
    m = random_model(cfg, torch.bfloat16, 0)
    w = m.blocks[0].mlp.w_in.weight.float()  # (8192, 2048)
    assert not torch.equal(w[0], w[1])
    assert abs(w.std().item() - 2048 ** -0.5) < 0.05 * 2048 ** -0.5
    wo = m.blocks[0].attn.wo.weight.float()  # out projection: 1/sqrt(2 L fan_in)
    assert abs(wo.std().item() - (2 * 1 * 2048) ** -0.5) < 0.05 * (2 * 2048) ** -0.5


def test_activations_stay_finite_through_96_layers():
    cfg = dataclasses.replace(from_name("gptj-175b"), n_embd=256, n_head=4, n_kv_head=4, head_dim=64,
                              intermediate_size=1024, vocab_size=512)
    m = random_model(cfg, torch.bfloat16, 0)
    engine = Engine(m, 2, 40, torch.bfloat16)
    with compute_context(torch.bfloat16):
        logits = engine.prefill(Prompts(torch.randint(512, (2, 32)), torch.ones(2, 32, dtype=torch.bool)))
        for _ in range(4):
            logits = engine.decode_one_token(logits.argmax(-1))
    assert torch.isfinite(logits.float()).all()
    assert logits.float().std() > 0.1  # the signal survives 96 blocks, it is not washed out


def test_materialized_memory_is_the_weights_once():
    # The OS's view: building ~1 GiB of bf16 weights raises peak RSS by about that much, not by an
    # fp32 copy (2x) or more. Measured in a fresh process.
    code = textwrap.dedent("""
        import torch
        from cpugen.model.config import from_name
        from cpugen.host.memory import peak_rss_bytes
        from cpugen.model.weights import random_model, weight_bytes
        base = peak_rss_bytes()  # the kernel's VmHWM
        m = random_model(from_name("gptj-1b").with_layers(8), torch.bfloat16, 0)
        peak = peak_rss_bytes()
        print(base, peak, weight_bytes(m))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ}, check=True).stdout
    base, peak, wbytes = map(int, out.split())
    assert wbytes > 900 * 2**20
    assert peak - base < 1.1 * wbytes + 128 * 2**20, (peak - base, wbytes)  # pools, allocator slack
    assert peak - base > 0.9 * wbytes  # every byte really written


def test_weight_bytes_counts_tied_embedding_once():
    m = random_model(from_name("opt-125m").with_layers(1), torch.bfloat16, 0)
    assert m.lm_head.weight is m.wte.weight
    assert weight_bytes(m) == 2 * sum(p.numel() for p in m.parameters())  # parameters() dedups ties
