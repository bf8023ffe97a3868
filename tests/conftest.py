"""Tiny random Hugging Face checkpoints, built with transformers and saved with `save_pretrained`.

transformers is the oracle: every test compares cpugen, loaded from these directories, with the
Hugging Face model that wrote them. No network: the hub is switched off before transformers loads.

The default HF initialisation (std 0.02, zero biases, unit norms) gives near-uniform logits, where
greedy decoding is decided by ties and a dropped bias or norm weight would go unnoticed. So every
parameter is redrawn from a seeded generator: matrices with std 1/sqrt(fan_in) (scaled by 2 so
the logits are spread), biases with std 0.1, norm weights around 1. Each family's config also
exercises the feature it is here for: GPT-J partial rotary (rotary_dim 8 < head_dim 16) and an
lm_head bias, OPT learned positions and tied embeddings, Llama GQA with an explicit head_dim,
llama3 rope scaling and rope_theta, Qwen2 q/k/v biases and tied embeddings, Mistral one kv head
and a sliding window shorter than the sequences the tests run.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: no hub access, ever
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# cpugen pins its workers, the main thread to the first core; in the test process (and the CLI
# processes it starts) that would leave later subprocesses one core. tests/test_placement.py
# turns pinning back on in the processes it checks.
os.environ["CPUGEN_PIN"] = "0"

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
VOCAB = 256
PAD, BOS, EOS = 0, 1, 2
FAMILIES = ("gptj", "opt", "llama", "qwen2", "mistral")
SLIDING_WINDOW = 8  # Mistral's window: shorter than prompt + 20 new tokens

# words of the tiny tokenizer; the rest of the vocabulary is filler tokens "t<id>"
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
         "a", "cat", "sat", "on", "mat", "and", "ran", "away"]


@pytest.fixture(autouse=True)
def _library_caps_stay_in_their_test():
    """A session opened under CPUGEN_ISA sets the libraries' caps in os.environ (cap_libraries); they
    must not reach the next test's child processes."""
    from cpugen.host.cpu import LIBRARY_CAPS

    names = tuple(LIBRARY_CAPS["avx2"])
    saved = {n: os.environ.get(n) for n in names}
    yield
    for n, v in saved.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


def hf_config(family: str, **override):
    import transformers as T

    common = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if family == "gptj":
        c = T.GPTJConfig(n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=None,
                         architectures=["GPTJForCausalLM"], **common)
    elif family == "opt":
        c = T.OPTConfig(max_position_embeddings=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                        num_attention_heads=4, word_embed_proj_dim=64, architectures=["OPTForCausalLM"], **common)
    elif family == "llama":
        c = T.LlamaConfig(max_position_embeddings=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                          rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                          architectures=["LlamaForCausalLM"], **common)
    elif family == "qwen2":
        c = T.Qwen2Config(max_position_embeddings=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                          tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"], **common)
    elif family == "mistral":
        c = T.MistralConfig(max_position_embeddings=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=1, sliding_window=SLIDING_WINDOW,
                            architectures=["MistralForCausalLM"], **common)
    else:
        raise ValueError(family)
    for k, v in override.items():
        setattr(c, k, v)
    return c


def randomize_(model: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 2.0 / math.sqrt(p.shape[-1])
                if "embed_positions" in name or name.endswith("wte.weight") or "embed_tokens" in name:
                    std = 1.0
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def build_hf(family: str, seed: int = 0, **override):
    """A seeded random HF model (fp32, eval, eager attention: a second attention implementation)."""
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(hf_config(family, **override), attn_implementation="eager")
    return randomize_(model, seed + 1000).eval()


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(WORDS)}
    for i in range(len(WORDS), VOCAB):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))


@dataclass
class Ckpt:
    family: str
    path: Path
    hf: torch.nn.Module  # the fp32 model that wrote the checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Ckpt]:
    out = {}
    for i, family in enumerate(FAMILIES):
        hf = build_hf(family, seed=i)
        d = tmp_path_factory.mktemp(f"hf-{family}")
        hf.save_pretrained(d)  # safetensors, one file
        assert (d / "model.safetensors").is_file()
        if family == "llama":
            make_tokenizer(d / "tokenizer.json")
        out[family] = Ckpt(family, d, hf)
    return out


@pytest.fixture(scope="session", params=FAMILIES)
def ckpt(request, checkpoints) -> Ckpt:
    return checkpoints[request.param]


# --- helpers shared by the test modules --------------------------------------------------------------
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [11, 12, 13], [20, 21, 22, 23, 24, 25], [30]]


def load(path: Path, dtype=torch.float32, layers: int | None = None):
    from cpugen.model.source import resolve
    from cpugen.model.weights import load_model

    cfg, ck = resolve(str(path))
    assert ck == Path(path)
    if layers is not None:
        cfg = cfg.with_layers(layers)
    return load_model(cfg, ck, dtype, 0)


def cpugen_prefill_logits(model, prompts, dtype=torch.float32):
    from cpugen.runtime.engine import Engine, Prompts, compute_context

    pb = Prompts.left_pad(prompts, PAD)
    eng = Engine(model, len(prompts), pb.tokens.shape[1] + 4, dtype)
    with compute_context(dtype):
        lg = eng.prefill(pb)
    model.free_caches()
    return lg.float(), pb


def hf_last_logits(hf, prompts):
    from cpugen.runtime.engine import Prompts

    pb = Prompts.left_pad(prompts, PAD)
    with torch.no_grad():
        return hf(input_ids=pb.tokens, attention_mask=pb.valid.long()).logits[:, -1].float()


def hf_greedy(hf, prompts, n: int) -> list[list[int]]:
    """HF generate, greedy, exactly n new tokens per prompt, left padding."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    # No eos_token_id: with one, min_new_tokens makes HF forbid EOS (its logit set to -inf) for the
    # first n tokens, while cpugen's ignore_eos keeps generating *after* an EOS without suppressing it.
    # Without eos, HF generates exactly n tokens and every argmax is unconstrained on both sides.
    # (HF fills an eos_token_id=None argument from the model's generation_config, so unset it there.)
    saved = hf.generation_config.eos_token_id
    hf.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD)
    finally:
        hf.generation_config.eos_token_id = saved
    assert out.shape[1] == T + n
    return out[:, T:].tolist()


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cpugen", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.fixture(autouse=True)
def _knobs_as_the_environment_says():
    """cpugen reads its CPUGEN_* knobs once per process; a test that changes one (monkeypatch.setenv,
    then knobs.reload()) leaves the next test the environment's own values, and no layout choice
    made under them (runtime/layout.py keeps one per process)."""
    yield
    from cpugen import knobs
    from cpugen.runtime import layout

    knobs.reload()
    layout.forget()
