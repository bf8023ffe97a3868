"""Native kernels against their torch references (kernels/reference.py), and the model's use of them."""

import sys

import pytest
import torch

from cpugen import native
from cpugen.config import from_name
from cpugen.env import cpu_info
from cpugen.generate import Engine, Prompts, compute_context
from cpugen.weights import random_model
from helpers import ROOT

sys.path.insert(0, str(ROOT))
from kernels import check_gemv, reference  # noqa: E402

def _decode(model, prompts, steps=4):
    """Prefill then `steps` greedy decode steps; the logits of each, stacked (steps + 1, B, V)."""
    B, T = prompts.tokens.shape
    e = Engine(model, B, T + steps + 1, torch.bfloat16)
    out = []
    with compute_context(torch.bfloat16):
        lg = e.prefill(prompts)
        out.append(lg)
        for _ in range(steps):
            lg = e.decode_one_token(lg.argmax(-1))
            out.append(lg)
    model.free_caches()
    return torch.stack(out).float()


needs_avx512 = pytest.mark.skipif(not cpu_info()["avx512"], reason="the native gemv needs AVX-512; "
                                  "machines without it run the torch reference (tested below)")


@needs_avx512
def test_gemv_matches_reference_on_awkward_shapes():
    ext = native.extension()
    assert ext is not None, native.why_not()
    assert ext.isa() == ("avx512_bf16" if cpu_info()["avx512_bf16"] else "avx512")
    results = check_gemv.check(ext, seed=3)  # raises past 2 bf16 ulps of the largest output
    assert len(results) == 2 * len(check_gemv.SHAPES)


@needs_avx512
def test_gemv_rejects_what_it_cannot_do():
    ext = native.extension()
    x = torch.randn(17, 64).bfloat16()
    w = torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        ext.gemv(x, w, None)
    with pytest.raises(RuntimeError, match="bf16 only"):
        ext.gemv(x[:2].float(), w.float(), None)


@needs_avx512
def test_model_decode_with_and_without_the_kernel():
    """The same model decodes to the same logits (within bf16 rounding) through the kernel and
    through F.linear; prefill's blocks (3 x 16 rows) never reach the kernel, its lm_head (the last
    position only: 3 rows) does."""
    cfg = from_name("gptj-1b").with_layers(2)
    model = random_model(cfg, torch.bfloat16, 0)
    calls = []
    prompts = Prompts(torch.randint(1000, (3, 16), generator=torch.Generator().manual_seed(0)),
                      torch.ones(3, 16, dtype=torch.bool))
    run = lambda: _decode(model, prompts)  # noqa: E731

    plain = run()
    assert native.install(model)
    gemv = model.lm_head.kernel

    def counting(x, w, b):
        calls.append(x.shape[0])
        return gemv(x, w, b)

    for m in model.modules():
        if getattr(m, "kernel", None) is not None:
            m.kernel = counting
    fast = run()
    assert calls and max(calls) <= 4
    n_linear = 4 * cfg.n_layer + 1
    assert len(calls) == 4 * n_linear + 1  # every linear of every decode step, and prefill's lm_head
    rel = (fast - plain).abs().max() / plain.abs().max()
    assert rel < 2e-2, rel


def test_reference_is_fp32_math_rounded_once():
    x = torch.randn(2, 64).bfloat16()
    w = torch.randn(5, 64).bfloat16()
    want = (x.double() @ w.double().T).to(torch.bfloat16)
    assert torch.equal(reference.gemv(x, w), want)


def test_switched_off_kernel_leaves_torch_path(monkeypatch):
    monkeypatch.setenv("CPUGEN_NATIVE", "0")
    model = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)
    assert native.install(model) is False
    assert all(getattr(m, "kernel", None) is None for m in model.modules())


def test_large_decode_batches_use_onednn_packed_weights_in_place():
    """Above the gemv's batches the eager backend reorders each weight once into oneDNN's layout,
    replacing it: same results as F.linear on the plain weights, same weight bytes."""
    from cpugen import backends
    from cpugen.weights import weight_bytes

    cfg = from_name("gptj-1b").with_layers(2)
    model = random_model(cfg, torch.bfloat16, 0)
    prompts = Prompts(torch.randint(1000, (8, 12), generator=torch.Generator().manual_seed(1)),
                      torch.ones(8, 12, dtype=torch.bool))

    run = lambda: _decode(model, prompts, 3)  # noqa: E731

    before, plain = weight_bytes(model), run()
    backends.apply(model, "eager", torch.bfloat16)
    backends.for_batch(model, "eager", torch.bfloat16, 1)
    assert backends.decode_matmul(model, "eager") in ("cpugen-gemv", "torch")  # batch 1: plain weights
    backends.for_batch(model, "eager", torch.bfloat16, backends.gemv_max_batch() + 1)
    assert backends.decode_matmul(model, "eager") == "onednn-packed"
    assert all(m.weight is None for m in model.blocks.modules() if hasattr(m, "packed") and m.packed is not None)
    assert weight_bytes(model) == before
    packed = run()
    assert (packed - plain).abs().max() / plain.abs().max() < 1e-2


@pytest.mark.skipif(not cpu_info()["avx512_bf16"], reason="the native decode attention needs AVX512-BF16; "
                    "elsewhere PyTorch's SDPA runs (the model's default path, tested by test_parity)")
def test_decode_attention_matches_reference():
    from kernels import check_decode_attention

    ext = native.extension("decode_attention")
    assert ext is not None, native.why_not("decode_attention")
    results = check_decode_attention.check(ext, seed=5)  # GQA, strided cache views, head dims 64-256
    assert len(results) == len(check_decode_attention.SHAPES)
    model = random_model(from_name("gptj-1b").with_layers(1), torch.bfloat16, 0)  # head dim 128
    native.install(model)
    assert all(b.attn.decode_kernel is not None for b in model.blocks)
    tiny = random_model(from_name("tiny-gptj"), torch.bfloat16, 0)  # head dim 16: not a multiple of 32
    native.install(tiny)
    assert all(b.attn.decode_kernel is None for b in tiny.blocks)
