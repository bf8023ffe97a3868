"""Hugging Face checkpoints: `config.json` -> ModelConfig, weights -> the model, tensor by tensor.

The model is built on the meta device; each parameter is allocated in the target dtype, then every
checkpoint tensor is read (safetensors: memory-mapped, its pages dropped right after the copy;
`pytorch_model*.bin`: torch.load with mmap, one shard at a time), converted and copied into its
place. So peak memory is the model in the target dtype plus one tensor (one shard for .bin), never
two copies of the weights. Every tensor is checked: missing, unexpected, mis-shaped and truncated
ones are errors naming the tensor; nothing is silently left uninitialized.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import warnings
from pathlib import Path

import torch

from cpugen import model as M
from cpugen.config import ModelConfig
from cpugen.errors import CpugenError
from cpugen.memory import empty_huge
from cpugen.progress import Progress

ARCHITECTURES = {
    "GPTJForCausalLM": "gptj",
    "OPTForCausalLM": "opt",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
}
# buffers older checkpoints saved that carry no weights
IGNORED = re.compile(r".*(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


# --- config ----------------------------------------------------------------------------------------
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
    return {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}.get(name, name)


_MAPPERS = {"gptj": _gptj, "opt": _opt, "llama": _llama}


# --- tensor names ----------------------------------------------------------------------------------
def _targets(cfg: ModelConfig) -> dict[str, tuple[str, int, int, bool]]:
    """HF tensor name -> (cpugen parameter, first row, rows, permute-for-rotary)."""
    q, kv, ffn = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    perm = cfg.position == "rotary" and cfg.rope_interleaved
    t: dict[str, tuple[str, int, int, bool]] = {}

    def whole(hf, ours, n):
        t[hf] = (ours, 0, n, False)

    def qkv(prefix, i, names, suffixes):
        for s in suffixes:
            ours = f"blocks.{i}.attn.wqkv.{s}"
            t[f"{prefix}{names[0]}.{s}"] = (ours, 0, q, perm)
            t[f"{prefix}{names[1]}.{s}"] = (ours, q, kv, perm)
            t[f"{prefix}{names[2]}.{s}"] = (ours, q + kv, kv, False)

    def both(hf, ours, n, bias=True):
        whole(f"{hf}.weight", f"{ours}.weight", n)
        if bias:
            whole(f"{hf}.bias", f"{ours}.bias", n)

    h, L = cfg.n_embd, cfg.n_layer
    qkv_suffixes = ["weight"] + (["bias"] if cfg.qkv_bias else [])
    if cfg.family == "gptj":
        whole("transformer.wte.weight", "wte.weight", cfg.vocab_size)
        for i in range(L):
            p = f"transformer.h.{i}."
            both(p + "ln_1", f"blocks.{i}.ln_1", h)
            qkv(p + "attn.", i, ("q_proj", "k_proj", "v_proj"), qkv_suffixes)
            both(p + "attn.out_proj", f"blocks.{i}.attn.wo", h, cfg.out_bias)
            both(p + "mlp.fc_in", f"blocks.{i}.mlp.w_in", ffn, cfg.mlp_bias)
            both(p + "mlp.fc_out", f"blocks.{i}.mlp.w_out", h, cfg.mlp_bias)
        both("transformer.ln_f", "ln_f", h)
    elif cfg.family == "opt":
        whole("model.decoder.embed_tokens.weight", "wte.weight", cfg.vocab_size)
        whole("model.decoder.embed_positions.weight", "wpe.weight", cfg.max_positions + cfg.position_offset)
        for i in range(L):
            p = f"model.decoder.layers.{i}."
            both(p + "self_attn_layer_norm", f"blocks.{i}.ln_1", h)
            qkv(p + "self_attn.", i, ("q_proj", "k_proj", "v_proj"), qkv_suffixes)
            both(p + "self_attn.out_proj", f"blocks.{i}.attn.wo", h, cfg.out_bias)
            both(p + "final_layer_norm", f"blocks.{i}.ln_2", h)
            both(p + "fc1", f"blocks.{i}.mlp.w_in", ffn, cfg.mlp_bias)
            both(p + "fc2", f"blocks.{i}.mlp.w_out", h, cfg.mlp_bias)
        both("model.decoder.final_layer_norm", "ln_f", h)
    else:
        whole("model.embed_tokens.weight", "wte.weight", cfg.vocab_size)
        for i in range(L):
            p = f"model.layers.{i}."
            whole(p + "input_layernorm.weight", f"blocks.{i}.ln_1.weight", h)
            whole(p + "post_attention_layernorm.weight", f"blocks.{i}.ln_2.weight", h)
            qkv(p + "self_attn.", i, ("q_proj", "k_proj", "v_proj"), qkv_suffixes)
            both(p + "self_attn.o_proj", f"blocks.{i}.attn.wo", h, cfg.out_bias)
            t[p + "mlp.gate_proj.weight"] = (f"blocks.{i}.mlp.w_in.weight", 0, ffn, False)
            t[p + "mlp.up_proj.weight"] = (f"blocks.{i}.mlp.w_in.weight", ffn, ffn, False)
            both(p + "mlp.down_proj", f"blocks.{i}.mlp.w_out", h, cfg.mlp_bias)
            if cfg.mlp_bias:
                t[p + "mlp.gate_proj.bias"] = (f"blocks.{i}.mlp.w_in.bias", 0, ffn, False)
                t[p + "mlp.up_proj.bias"] = (f"blocks.{i}.mlp.w_in.bias", ffn, ffn, False)
        whole("model.norm.weight", "ln_f.weight", h)
    if not cfg.tie_embeddings:
        both("lm_head", "lm_head", cfg.vocab_size, cfg.lm_head_bias)
    return t


def _canonical(name: str, family: str) -> str:
    if family == "opt" and name.startswith("decoder."):  # some OPT checkpoints drop "model."
        return "model." + name
    return name


def _rotary_perm(cfg: ModelConfig, rows: int) -> torch.Tensor:
    """Row order turning GPT-J's interleaved rotary pairs (2i, 2i+1) into half-split (i, i+rd/2)."""
    hd, rd = cfg.head_dim, cfg.rotary_dim
    within = torch.cat([torch.arange(0, rd, 2), torch.arange(1, rd, 2), torch.arange(rd, hd)])
    heads = rows // hd
    return (torch.arange(heads)[:, None] * hd + within[None, :]).reshape(-1)


# --- readers ---------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_tensors(path: Path):
    """Yields (name, tensor viewing the mapped file, release()) for one .safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CpugenError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CpugenError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CpugenError(f"{path}: corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise CpugenError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        base = 8 + n
        for name, info in header.items():
            _check_entry(path, name, info)
            end = base + info["data_offsets"][1]
            if end > size:
                raise CpugenError(f"{path}: truncated: tensor {name} needs bytes up to {end}, file has {size}")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, stop = (base + o for o in info["data_offsets"])
            dtype = _ST_DTYPES[info["dtype"]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only buffer: we only read it
                t = torch.frombuffer(mm, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=start) \
                    if stop > start else torch.empty(0, dtype=dtype)
            yield name, t.view(info["shape"]), lambda s=start, e=stop: _drop_pages(mm, s, e)
            del t
    finally:
        try:
            mm.close()
        except BufferError:  # a caller still holds a view; the map closes when it is collected
            pass


def _check_entry(path: Path, name: str, info):
    """One header entry: a known dtype, a shape, and data_offsets spanning exactly shape x itemsize."""
    dtype_name = info.get("dtype") if isinstance(info, dict) else None
    if isinstance(dtype_name, str) and dtype_name not in _ST_DTYPES:
        raise CpugenError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
    try:
        shape, (start, stop) = info["shape"], info["data_offsets"]
        ok = (all(isinstance(x, int) and x >= 0 for x in [*shape, start, stop])
              and stop - start == math.prod(shape) * _ST_DTYPES[dtype_name].itemsize)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CpugenError(f"{path}: corrupt safetensors header: entry for tensor {name} ({json.dumps(info)[:200]}) "
                          "does not describe its bytes (dtype, shape and data_offsets disagree)")


def _drop_pages(mm: mmap.mmap, start: int, stop: int):
    """Tell the kernel we are done with these file pages, so they leave this process's RSS."""
    page = mmap.PAGESIZE
    lo = start // page * page
    if stop > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, stop - lo)


def _bin_tensors(path: Path):
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error here
        raise CpugenError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})".split("\n")[0]) from None
    for name, t in sd.items():
        yield name, t, lambda: None
    del sd


def _files(path: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CpugenError(f"{index}: not a valid index (no weight_map)") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CpugenError(f"{path}: shard(s) named in {index_name} are missing: {', '.join(missing)}")
            return files
        if (path / single).is_file():
            return [path / single]
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not found:
        raise CpugenError(f"{path}: no weights found (model.safetensors, sharded *.safetensors with "
                          "their index, or pytorch_model*.bin)")
    return found


def _tensors(path: Path):
    for f in _files(path):
        yield from (_safetensors_tensors(f) if f.suffix == ".safetensors" else _bin_tensors(f))


# --- loading ---------------------------------------------------------------------------------------
def load_checkpoint(cfg: ModelConfig, path: Path, dtype: torch.dtype, progress: Progress | None = None):
    model = M.build(cfg, dtype)
    params = dict(model.named_parameters(remove_duplicate=False))
    for pname, p in params.items():  # allocate each parameter in its final dtype
        if pname == "lm_head.weight" and cfg.tie_embeddings:
            continue
        _set_param(model, pname, empty_huge(p.shape, dtype))  # on huge pages: decode streams these
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = _targets(cfg)
    # rows of each parameter not yet written
    todo = {hf: v for hf, v in targets.items()}
    skipped_layers = re.compile(r".*\.(h|layers)\.(\d+)\.")
    # blocks cfg.n_layer..n_stored-1 are the ones --layers left out; a block beyond what the
    # checkpoint's own config.json declares is a mismatch, reported as unexpected
    n_stored = _stored_layers(cfg, path)
    n_total = len(targets)
    for name, t, release in _tensors(path):
        name = _canonical(name, cfg.family)
        if name not in targets:
            m = skipped_layers.match(name)
            if IGNORED.match(name) or (m and cfg.n_layer <= int(m.group(2)) < n_stored):
                release()
                continue  # a buffer, or a block beyond --layers
            if name == "lm_head.weight" and cfg.tie_embeddings:
                release()
                continue  # tied: the embedding is the head
            raise CpugenError(f"{path}: unexpected tensor {name} {tuple(t.shape)} in checkpoint "
                              f"(not part of a {cfg.family} model with this config)")
        if name not in todo:
            raise CpugenError(f"{path}: tensor {name} appears twice in the checkpoint")
        pname, row0, rows, permute = todo.pop(name)
        dst = params[pname]
        want = (rows,) + tuple(dst.shape[1:])
        if tuple(t.shape) != want:
            raise CpugenError(f"{path}: tensor {name} has shape {tuple(t.shape)} in the checkpoint, "
                              f"the config needs {want}")
        src = t[_rotary_perm(cfg, rows)] if permute else t
        dst[row0:row0 + rows].copy_(src)
        release()
        del t, src
        if progress:
            progress.update(n_total - len(todo), n_total, "tensors")
    if todo:
        names = sorted(todo)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        pname, _, rows, _ = todo[names[0]]
        raise CpugenError(f"{path}: checkpoint is missing tensor {names[0]} (shape "
                          f"{(rows,) + tuple(params[pname].shape[1:])}){more}")
    return model


def _stored_layers(cfg: ModelConfig, path: Path) -> int:
    """Blocks in the checkpoint per its config.json (cfg may be cut down by --layers)."""
    try:
        return max(cfg.n_layer, config_from_hf(path).n_layer)
    except CpugenError:
        return cfg.n_layer


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))
