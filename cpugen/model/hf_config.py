"""Hugging Face `config.json` -> ModelConfig, for every supported architecture."""

from __future__ import annotations

import json
from pathlib import Path

from cpugen.errors import CpugenError
from cpugen.model.activations import HF_ALIASES
from cpugen.model.config import ModelConfig

ARCHITECTURES = {
    "GPTJForCausalLM": "gptj",
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}

# --- mapping -----------------------------------------------------------------------------------------
def config_from_hf(path: Path) -> ModelConfig:
    f = path / "config.json"
    if not f.is_file():
        raise CpugenError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CpugenError(f"{f}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return config_from_hf_dict(d, str(f), name=path.name)


# config.json keys the mappers read as sizes / floats: checked up front, so a malformed value is an
# error naming the key, not a TypeError (or a model with a string epsilon) further down
_HF_INTS = ("vocab_size", "n_embd", "n_head", "n_layer", "n_inner", "n_positions", "rotary_dim", "hidden_size",
            "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "head_dim", "intermediate_size",
            "ffn_dim", "max_position_embeddings", "word_embed_proj_dim", "sliding_window")
_HF_OPTIONAL_INTS = ("n_inner", "rotary_dim", "num_key_value_heads", "head_dim", "sliding_window",
                     "word_embed_proj_dim")
_HF_FLOATS = {"layer_norm_epsilon": 0, "rms_norm_eps": 0, "rope_theta": 1e-30}  # key: smallest valid value


def _check_values(d: dict, where: str):
    for k in _HF_INTS:
        if k not in d or (d[k] is None and k in _HF_OPTIONAL_INTS):
            continue
        v = d[k]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CpugenError(f"{where}: {k} must be a positive integer, not {v!r}")
    for k, least in _HF_FLOATS.items():
        v = d.get(k)
        if k in d and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= least):
            raise CpugenError(f"{where}: {k} must be a {'positive' if least else 'non-negative'} number, not {v!r}")
    archs = d.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CpugenError(f"{where}: architectures must be a list of names, not {archs!r}")


def config_from_hf_dict(d: dict, where: str, name: str | None = None) -> ModelConfig:
    if not isinstance(d, dict):
        raise CpugenError(f"{where}: a Hugging Face config must be a JSON object, not {type(d).__name__}")
    _check_values(d, where)
    archs = d.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        guess = {"gptj": "GPTJForCausalLM", "opt": "OPTForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(d.get("model_type"))
        if archs or guess is None:
            raise CpugenError(f"{where}: unsupported architecture {archs or d.get('model_type')!r}; "
                              f"cpugen supports {', '.join(ARCHITECTURES)}")
        arch = guess
    family = ARCHITECTURES[arch]
    name = name or Path(where).parent.name
    try:
        return _MAPPERS[family](d, name=name, source=f"{arch} {where}")
    except KeyError as e:
        raise CpugenError(f"{where}: missing key {e.args[0]!r} for {arch}") from None
    except CpugenError as e:
        if where in str(e):
            raise
        raise CpugenError(f"{where}: {e}") from None  # ModelConfig's own checks: say which file
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # e.g. a dict where a number goes
        raise CpugenError(f"{where}: malformed {arch} config ({type(e).__name__}: {e})".splitlines()[0]) from None


def _gptj(d, **kw) -> ModelConfig:
    h, nh = d["n_embd"], d["n_head"]
    return ModelConfig(
        family="gptj", vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_embd=h, n_head=nh, n_kv_head=nh,
        head_dim=h // nh, intermediate_size=d.get("n_inner") or 4 * h, max_positions=d["n_positions"],
        norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=_act(d.get("activation_function", "gelu_new")), mlp="plain", parallel_residual=True,
        position="rotary", rotary_dim=d.get("rotary_dim") or h // nh, rope_interleaved=True,
        qkv_bias=False, out_bias=False, mlp_bias=True, lm_head_bias=True,
        tie_embeddings=d.get("tie_word_embeddings", False), bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"), **kw)


def _opt(d, **kw) -> ModelConfig:
    h = d["hidden_size"]
    if not d.get("do_layer_norm_before", True):
        raise CpugenError(f"{kw['source']}: OPT with post-LayerNorm (do_layer_norm_before=false, as in "
                          "opt-350m) is not supported")
    if d.get("word_embed_proj_dim", h) != h:
        raise CpugenError(f"{kw['source']}: OPT with project_in/project_out (word_embed_proj_dim "
                          f"{d['word_embed_proj_dim']} != hidden_size {h}, as in opt-350m) is not supported")
    if not d.get("layer_norm_elementwise_affine", True):
        raise CpugenError(f"{kw['source']}: OPT without LayerNorm affine parameters is not supported")
    bias = d.get("enable_bias", True)
    return ModelConfig(
        family="opt", vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_embd=h,
        n_head=d["num_attention_heads"], n_kv_head=d["num_attention_heads"],
        head_dim=h // d["num_attention_heads"], intermediate_size=d["ffn_dim"],
        max_positions=d["max_position_embeddings"], norm="layernorm", norm_eps=1e-5,
        activation=_act(d.get("activation_function", "relu")), mlp="plain", parallel_residual=False,
        position="learned", position_offset=2, rotary_dim=0, qkv_bias=bias, out_bias=bias, mlp_bias=bias,
        lm_head_bias=False, tie_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), **kw)


def _llama(d, **kw) -> ModelConfig:
    h, nh = d["hidden_size"], d["num_attention_heads"]
    hd = d.get("head_dim") or h // nh
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "linear", "llama3"):
        raise CpugenError(f"{kw['source']}: rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                          "is not supported (supported: linear, llama3)")
    qwen = "Qwen2" in kw["source"]
    window = d.get("sliding_window") if (d.get("use_sliding_window", True) if qwen else True) else None
    attn_bias = d.get("attention_bias", False)
    return ModelConfig(
        family="llama", vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_embd=h, n_head=nh,
        n_kv_head=d.get("num_key_value_heads") or nh, head_dim=hd, intermediate_size=d["intermediate_size"],
        max_positions=d["max_position_embeddings"], norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=_act(d.get("hidden_act", "silu")), mlp="glu", parallel_residual=False, position="rotary",
        rotary_dim=hd, rope_theta=float(theta), rope_scaling=scaling, sliding_window=window,
        qkv_bias=qwen or attn_bias, out_bias=attn_bias, mlp_bias=d.get("mlp_bias", False), lm_head_bias=False,
        tie_embeddings=d.get("tie_word_embeddings", False), bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"), **kw)


def _act(name: str) -> str:
    return HF_ALIASES.get(name, name)


_MAPPERS = {"gptj": _gptj, "opt": _opt, "llama": _llama}
