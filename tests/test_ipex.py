"""The ipex backend against eager and against Hugging Face, in the IPEX environment.

    bash scripts/ipex_env.sh
    ~/.cache/cpugen/ipex-venv/bin/python -m pytest -q -m ipex

Every test here is marked `ipex`: the main suite deselects them (`-m "not ipex"`) and the IPEX
environment runs them (`-m ipex`). Selected in an environment without IPEX they FAIL, saying
why; they never skip.

Reference: the eager backend in a separate process that never imports IPEX (importing IPEX swaps
some aten CPU kernels, layer_norm among them, so "eager after IPEX" is not quite eager).

Tolerances, bf16, measured rather than assumed: the reference process also runs the same weights
in fp32 (the bf16 weights are the fp32 ones rounded), so eager bf16's own error e = |eager bf16 -
fp32| is known. IPEX must (1) differ from eager by at most 2 e, max and mean alike: the backends
disagree by no more than bf16 itself is off; and (2) be no less accurate: mean |ipex bf16 - fp32|
<= 1.25 mean e and max <= 1.5 max e (a single element's max is noisy). Measured on these models:
GPT-J and OPT identical or all but (one decode logit 1 ulp off); Llama (RMSNorm with non-unit
weights) |ipex - eager| = 0.95 mean e, 1.07-1.16 max e, and IPEX slightly MORE accurate on
average (0.92-0.94 mean e, 0.83-1.28 max e): its RMSNorm rounds once where eager rounds twice
(normalize -> bf16, then * weight). The rest is rounding order, oneDNN's prepacked GEMM vs
PyTorch's. Greedy tokens must agree up to the first step whose eager top-2 margin is within twice
the allowed difference (a near-tie may break either way; nothing after it is compared).
fp32: 1e-4 of the largest logit, as in the HF parity tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpugen.runtime import ipex as ipex_backend
from cpugen.runtime import backends
from cpugen.model.config import from_dict
from cpugen.host.cpu import cpu_info
from cpugen.runtime.engine import Engine, Prompts, compute_context, generate
from cpugen.model.transformer import Linear, Norm
from cpugen.runtime.sampling import Sampling
from cpugen.model.weights import random_model, weight_bytes

pytestmark = pytest.mark.ipex

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

_COMMON = dict(n_layer=2, max_positions=128, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    # partial rotary (8 of 16), parallel residual, gelu_new, lm_head bias
    "gptj": dict(name="ipex-gptj", family="gptj", vocab_size=256, n_embd=64, n_head=4, n_kv_head=4, head_dim=16,
                 intermediate_size=256, norm="layernorm", activation="gelu_new", mlp="plain",
                 parallel_residual=True, position="rotary", rotary_dim=8, rope_interleaved=True,
                 mlp_bias=True, lm_head_bias=True, **_COMMON),
    # learned positions at offset 2, tied embeddings (the lm_head is not prepacked), relu, biases
    "opt": dict(name="ipex-opt", family="opt", vocab_size=320, n_embd=64, n_head=4, n_kv_head=4, head_dim=16,
                intermediate_size=256, norm="layernorm", activation="relu", mlp="plain", position="learned",
                position_offset=2, qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                pad_token_id=1, **_COMMON),
    # grouped-query attention (8 query heads on 2 kv heads), RMSNorm, SiLU GLU
    "llama-gqa": dict(name="ipex-llama-gqa", family="llama", vocab_size=384, n_embd=128, n_head=8, n_kv_head=2,
                      head_dim=16, intermediate_size=256, norm="rmsnorm", activation="silu", mlp="glu",
                      position="rotary", rotary_dim=16, rope_theta=500000.0, **_COMMON),
}
T_PROMPT, N_NEW = 12, 10
GEN_PROMPTS = [[5 + i for i in range(9)], [40, 41, 42, 43, 44]]  # different lengths: left padding


# --- models and the eager reference --------------------------------------------------------------
def _model(name: str, dtype: torch.dtype):
    """Random weights, with norm weights/biases and linear biases redrawn: random_model leaves them
    at 1 and 0, which would hide a norm or bias the fused kernels got wrong."""
    model = random_model(from_dict(dict(CONFIGS[name]), name), dtype, seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if model.cfg.tie_embeddings:  # else the tied unit-variance embedding makes greedy repeat the input token
            model.wte.weight.mul_(0.1)
            model.wpe.weight.mul_(0.1)
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                is_norm_weight = pname.endswith("weight")  # 1-d weights are norm weights
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.25 * noise if is_norm_weight else 0.1 * noise)
    return model


def _prompt_tokens(cfg):
    return torch.randint(3, cfg.vocab_size, (2, T_PROMPT), generator=torch.Generator().manual_seed(1))


def _prompt_logits(model, dtype):
    """(2, T, V) fp32: every position of an unpadded prompt."""
    tokens = _prompt_tokens(model.cfg)
    model.setup_caches(2, T_PROMPT, dtype)
    with compute_context(dtype):
        out = model(tokens, torch.arange(T_PROMPT).expand(2, T_PROMPT), None, 0, False).float()
    model.free_caches()
    return out


def _step_logits(model, dtype, tokens):
    """(N_NEW, 2, V) fp32: the logits of the padded prompts' prefill, then of each decode step fed
    `tokens` (N_NEW - 1, 2), teacher-forced so both sides see the same inputs."""
    batch = Prompts.left_pad(GEN_PROMPTS, model.cfg.pad_token_id or 0)
    eng = Engine(model, 2, batch.tokens.shape[1] + N_NEW, dtype)
    with compute_context(dtype):
        out = [eng.prefill(batch).float()]
        for t in tokens:
            out.append(eng.decode_one_token(t).float())
    model.free_caches()
    return torch.stack(out)


def _greedy(model, dtype):
    return generate(model, GEN_PROMPTS, N_NEW, Sampling(), dtype, ignore_eos=True)


def write_reference(path: str):
    """Run in a fresh process (see the `reference` fixture): the eager backend, IPEX never imported."""
    ref = {}
    for name in CONFIGS:
        model = backends.apply(_model(name, torch.bfloat16), "eager", torch.bfloat16)
        greedy = _greedy(model, torch.bfloat16)
        forced = torch.tensor(greedy).T[:-1]  # (N_NEW - 1, 2)
        steps = _step_logits(model, torch.bfloat16, forced)
        assert torch.equal(steps.argmax(-1).T, torch.tensor(greedy))  # generate() == the Engine loop
        fp32 = backends.apply(_model(name, torch.float32), "eager", torch.float32)
        ref[name] = {"prompt": _prompt_logits(model, torch.bfloat16), "steps": steps, "greedy": greedy,
                     "prompt_fp32": _prompt_logits(fp32, torch.float32),
                     "steps_fp32": _step_logits(fp32, torch.float32, forced)}
    assert "intel_extension_for_pytorch" not in sys.modules
    torch.save(ref, path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("eager") / "reference.pt"
    code = f"import sys; sys.path[:0] = [{str(HERE)!r}, {str(REPO)!r}]; import test_ipex; test_ipex.write_reference(sys.argv[1])"
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(path)


@pytest.fixture(scope="module")
def ipex():
    ipex, why = ipex_backend.import_ipex()
    if ipex is None:
        pytest.fail(f"the ipex tests need the IPEX environment (bash scripts/ipex_env.sh, then its python "
                    f"-m pytest -m ipex): {why}")
    return ipex


def _assert_close_bf16(got, eager, fp32, what) -> float:
    """See the module docstring; returns the largest difference allowed."""
    err = (eager - fp32).abs()
    d = (got - eager).abs()
    scale = float(fp32.abs().max())
    msg = (f"{what}: |ipex - eager| max {float(d.max()):.4g} mean {float(d.mean()):.4g}; eager bf16 error "
           f"max {float(err.max()):.4g} mean {float(err.mean()):.4g}; largest logit {scale:.4g}")
    assert float(d.max()) <= 2 * float(err.max()), msg
    assert float(d.mean()) <= 2 * float(err.mean()), msg
    own = (got - fp32).abs()
    msg += f"; ipex's own error max {float(own.max()):.4g} mean {float(own.mean()):.4g}"
    assert float(own.mean()) <= 1.25 * float(err.mean()) and float(own.max()) <= 1.5 * float(err.max()), msg
    return 2 * float(err.max())


def _assert_tokens_agree(got, ref_tokens, ref_steps, tol):
    """Equal up to the first step whose reference top-2 margin is within tol."""
    top2 = ref_steps.topk(2, dim=-1).values  # (N_NEW, B, 2)
    margin = (top2[..., 0] - top2[..., 1]).T  # (B, N_NEW)
    for b, (g, r) in enumerate(zip(got, ref_tokens)):
        assert len(g) == len(r) == N_NEW
        for i, (x, y) in enumerate(zip(g, r)):
            if float(margin[b, i]) <= tol:
                break  # a near-tie: either token is right, and the rest follows from it
            assert x == y, f"sequence {b} step {i}: ipex {x}, eager {y} (eager margin {float(margin[b, i]):.4g})"


# --- IPEX vs eager -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_matches_eager(name, ipex, reference):
    ref = reference[name]
    model = _model(name, torch.bfloat16)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    tied = model.cfg.tie_embeddings
    assert backends.apply(model, "ipex", torch.bfloat16) is model

    # what apply did: every Linear prepacked except a tied lm_head, where IPEX can prepack bf16
    # (AVX-512 BW/VL/DQ or AVX-NE-CONVERT; on an AVX2 CPU none is); every norm fused
    can = ipex_backend.bf16_ok(ipex_backend.import_ipex()[0])
    packed = [m for m in model.modules() if type(m).__name__ == "_IPEXLinear"]
    assert len(packed) == (n_linear - (1 if tied else 0) if can else 0)
    assert (type(model.lm_head).__name__ == "_IPEXLinear") == (can and not tied)
    if tied:
        assert model.lm_head.weight is model.wte.weight
        assert type(model.lm_head) is Linear  # left unpacked, as it was
    norms = [m for m in model.modules() if isinstance(m, Norm)]
    assert norms and all(m.impl is not None for m in norms)

    _assert_close_bf16(_prompt_logits(model, torch.bfloat16), ref["prompt"], ref["prompt_fp32"], f"{name} prompt")
    forced = torch.tensor(ref["greedy"]).T[:-1]
    steps = _step_logits(model, torch.bfloat16, forced)
    allowed = _assert_close_bf16(steps, ref["steps"], ref["steps_fp32"], f"{name} prefill/decode (padded batch)")
    _assert_tokens_agree(_greedy(model, torch.bfloat16), ref["greedy"], ref["steps"], 2 * allowed)
    assert any(len(set(seq)) > 2 for seq in ref["greedy"])  # not a degenerate model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_matches_eager(name, ipex, reference):
    model = _model(name, torch.float32)
    backends.apply(model, "ipex", torch.float32)
    assert any(type(m).__name__ == "_IPEXLinear" for m in model.modules())
    got, ref = _prompt_logits(model, torch.float32), reference[name]["prompt_fp32"]
    assert rel_err(got, ref) <= 1e-4, f"{name}: fp32 relative max error {rel_err(got, ref):.2e}"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


# --- IPEX on Hugging Face checkpoints (saved by this environment's transformers) -------------------
# `ckpt`: tests/conftest.py's tiny seeded HF models (GPT-J, OPT, Llama, Qwen2, Mistral), each saved
# with save_pretrained, and the HF model that wrote it.
def test_checkpoint_fp32_matches_hf(ckpt, ipex):
    from conftest import PROMPTS, cpugen_prefill_logits, hf_greedy, hf_last_logits, load

    model = load(ckpt.path)
    backends.apply(model, "ipex", torch.float32)
    lg, _ = cpugen_prefill_logits(model, PROMPTS)
    ref = hf_last_logits(ckpt.hf, PROMPTS)
    assert rel_err(lg, ref) <= 1e-4, f"{ckpt.family}: relative max error {rel_err(lg, ref):.2e}"
    out = generate(model, PROMPTS, 12, Sampling(), torch.float32, ignore_eos=True)
    assert out == hf_greedy(ckpt.hf, PROMPTS, 12)


def test_checkpoint_bf16_matches_eager(ckpt, ipex):
    """Same criteria as above with HF's fp32 logits as the truth; eager here runs in this process,
    after IPEX's import (within rounding of a clean process's)."""
    from conftest import PROMPTS, cpugen_prefill_logits, hf_last_logits, load

    eager, _ = cpugen_prefill_logits(load(ckpt.path, torch.bfloat16), PROMPTS, torch.bfloat16)
    model = load(ckpt.path, torch.bfloat16)
    backends.apply(model, "ipex", torch.bfloat16)
    lg, _ = cpugen_prefill_logits(model, PROMPTS, torch.bfloat16)
    _assert_close_bf16(lg, eager, hf_last_logits(ckpt.hf, PROMPTS), f"{ckpt.family} checkpoint, last logits")


# --- the CLI -------------------------------------------------------------------------------------
def _cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cpugen", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)


# auto: cpugen's native kernels for bf16 where the CPU has AVX-512 (faster than ipex there:
# cpugen/runtime/backends.py), elsewhere ipex where IPEX can run bf16 here, eager where it cannot;
# ipex for fp32
AUTO_BF16 = "eager, or ipex where IPEX runs bf16 and cpugen's kernels do not"  # resolved in the test


def _auto_bf16() -> str:  # imports IPEX: only inside a test (the reference is written without it)
    return "eager" if cpu_info()["avx512"] or not ipex_backend.bf16_ok(ipex_backend.import_ipex()[0]) else "ipex"


@pytest.mark.parametrize("backend,dtype,expect", [("ipex", "bfloat16", "ipex"), ("auto", "bfloat16", AUTO_BF16),
                                                  ("auto", "float32", "ipex"), ("ipex", "float32", "ipex"),
                                                  ("eager", "bfloat16", "eager")])
def test_cli_run_json(backend, dtype, expect, ipex):
    p = _cli("run", "--model", "tiny-gptj", "--prompt-len", "16", "--gen-len", "8", "--backend", backend,
             "--dtype", dtype, "--json", "-")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)  # stdout is the record and nothing else (IPEX's import notices held back)
    assert rec["backend"] == (_auto_bf16() if expect == AUTO_BF16 else expect) and rec["dtype"] == dtype
    assert rec["torch_version"].startswith("2.8") and rec["ipex_version"].startswith("2.8")
    assert rec["decode_steps"] == 7 and rec["decode_time_per_token_s"] > 0
    assert "Overriding a previously registered kernel" not in p.stderr


def test_cli_generate_ipex_equals_eager(tmp_path, ipex):
    cfg = tmp_path / "llama-gqa.json"
    cfg.write_text(json.dumps(CONFIGS["llama-gqa"]))
    args = ["generate", "--model", str(cfg), "--prompt-ids", "5,6,7,8", "--prompt-ids", "9,10",
            "--max-new-tokens", "6", "--ignore-eos", "--json", "-"]
    eager, ipx = _cli(*args, "--backend", "eager"), _cli(*args, "--backend", "ipex")
    assert eager.returncode == 0 and ipx.returncode == 0, eager.stderr + ipx.stderr
    assert json.loads(ipx.stdout)["tokens"] == json.loads(eager.stdout)["tokens"]


# --- memory: prepacking replaces the weights, it does not copy them -------------------------------
RSS_PROBE = """
import gc, json, resource, sys, psutil, torch
from cpugen.runtime import backends
from cpugen.runtime import ipex as ipex_backend
from cpugen.model.config import from_dict
from cpugen.model.weights import random_model, weight_bytes
ipex_backend.import_ipex()  # IPEX's own footprint is not the model's
proc = psutil.Process()
model = random_model(from_dict(json.loads(sys.argv[1]), "rss"), torch.bfloat16, 0)
gc.collect()
before, peak_before = proc.memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
backends.apply(model, "ipex", torch.bfloat16)
gc.collect()
after, peak_after = proc.memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
largest = max(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(weights=weight_bytes(model), largest=largest, before=before, after=after,
                      peak_before=peak_before, peak_after=peak_after)))
"""
RSS_CONFIG = dict(name="rss", family="gptj", vocab_size=32000, n_layer=10, n_embd=1024, n_head=8, n_kv_head=8,
                  head_dim=128, intermediate_size=4096, max_positions=256, norm="layernorm",
                  activation="gelu_new", parallel_residual=True, position="rotary", rotary_dim=64,
                  mlp_bias=True, lm_head_bias=True)  # ~0.4 GB of bf16 weights


def test_prepack_does_not_hold_weights_twice(ipex):
    p = subprocess.run([sys.executable, "-c", RSS_PROBE, json.dumps(RSS_CONFIG)], capture_output=True, text=True,
                       cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    mib = {k: v / 2**20 for k, v in m.items()}
    assert m["weights"] > 300 * 2**20
    # resident after optimize: the weights once, plus a little (measured: +15 MiB on 778 MiB)
    assert m["after"] - m["before"] <= 0.1 * m["weights"], f"RSS grew by optimize: {mib}"
    # high-water mark while packing: one tensor in flight at a time, never a second set of weights
    assert m["peak_after"] - m["before"] <= m["largest"] + 0.1 * m["weights"], f"peak during optimize: {mib}"
