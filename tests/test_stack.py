"""The native decode stack fails closed: every config field has a place, and a model needing what
the stack lacks gets no stack (its Python blocks run every decode step, and the record says so)."""

import dataclasses

import torch

from cpugen.model.config import ModelConfig, from_name
from cpugen.model.weights import random_model
from cpugen.runtime import stack
from cpugen.runtime.engine import Engine, Prompts, compute_context


def test_every_config_field_is_classified_for_the_stack():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unclassified = fields - set(stack.HANDLED) - set(stack.IRRELEVANT)
    assert not unclassified, f"classify {sorted(unclassified)} in cpugen/runtime/stack.py (HANDLED or IRRELEVANT)"
    assert not set(stack.HANDLED) & set(stack.IRRELEVANT)
    assert set(stack.HANDLED) | set(stack.IRRELEVANT) == fields  # nothing stale listed either


def test_presets_are_within_what_the_stack_runs():
    for name in ("gptj-1b", "gptj-175b", "opt-1.3b", "llama-2-7b", "llama-3-8b", "mistral-7b"):
        assert stack.refusal(from_name(name)) is None, name


def test_a_head_dim_decode_attention_lacks_is_refused():
    cfg = dataclasses.replace(from_name("tiny-gptj"), head_dim=24, rotary_dim=8)
    assert "head_dim 24" in stack.refusal(cfg)
    assert stack.refusal(dataclasses.replace(from_name("gptj-1b"), head_dim=512, rotary_dim=64))


def test_a_refused_model_runs_its_python_blocks_and_says_so():
    """install() refuses before it looks for the kernel, so this holds on every CPU; the steps are
    counted as they run, not re-derived."""
    cfg = dataclasses.replace(from_name("tiny-gptj"), n_embd=96, n_head=4, head_dim=24, rotary_dim=8)
    model = random_model(cfg, torch.bfloat16, 0)
    assert stack.install(model) is False
    assert model.decode_stack is None and "head_dim 24" in model.stack_refused
    e = Engine(model, 2, 12, torch.bfloat16)
    with compute_context(torch.bfloat16):
        logits = e.prefill(Prompts(torch.randint(cfg.vocab_size, (2, 8)), torch.ones(2, 8, dtype=torch.bool)))
        for _ in range(3):
            logits = e.decode_one_token(logits.argmax(-1))
    assert model.decode_paths == {"python": 3}
    assert stack.observed(model.decode_paths) == "python"
    assert stack.observed({"native-stack": 2, "python": 1}) == "mixed: native-stack 2, python 1 steps"
