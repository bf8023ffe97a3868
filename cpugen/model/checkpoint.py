"""Hugging Face checkpoints' tensors -> the model, tensor by tensor (config.json: hf_config.py).

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

from cpugen.model import shard
from cpugen.model import transformer as M
from cpugen.model.shard import Shard
from cpugen.model.config import ModelConfig
from cpugen.model.hf_config import config_from_hf
from cpugen.errors import CpugenError
from cpugen.host.memory import empty_huge
from cpugen.progress import Progress

# buffers older checkpoints saved that carry no weights
IGNORED = re.compile(r".*(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


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
def load_checkpoint(cfg: ModelConfig, path: Path, dtype: torch.dtype, progress: Progress | None = None,
                    s: Shard = Shard()):
    """The model, or tensor-parallel rank s's share of it: each checkpoint tensor is then read only
    where it overlaps the rank's rows and columns (a slice of the mapped file), never whole."""
    model = M.build(shard.local_config(cfg, s), dtype, vocab_rows=None if s.whole else shard.vocab_rows(cfg, s))
    full = dict(M.build(cfg, dtype).named_parameters(remove_duplicate=False)) if not s.whole else None
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
        want = (rows,) + tuple((full[pname] if full else dst).shape[1:])
        if tuple(t.shape) != want:
            raise CpugenError(f"{path}: tensor {name} has shape {tuple(t.shape)} in the checkpoint, "
                              f"the config needs {want}")
        perm = _rotary_perm(cfg, rows) if permute else None
        if s.whole:
            dst[row0:row0 + rows].copy_(t[perm] if permute else t)
        else:
            _copy_share(dst, t, perm, row0, rows, pname, cfg, s)
        release()
        del t
        if progress:
            progress.update(n_total - len(todo), n_total, "tensors")
    if todo:
        names = sorted(todo)
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        pname, _, rows, _ = todo[names[0]]
        raise CpugenError(f"{path}: checkpoint is missing tensor {names[0]} (shape "
                          f"{(rows,) + tuple(params[pname].shape[1:])}){more}")
    return model


def _copy_share(dst: torch.Tensor, t: torch.Tensor, perm: torch.Tensor | None, row0: int, rows: int, pname: str,
                cfg: ModelConfig, s: Shard):
    """Copies into rank s's parameter `dst` the part of checkpoint tensor t (rows row0..row0+rows of
    the full parameter `pname`, permuted by `perm`) that the rank holds; only those rows and columns
    of t are read."""
    local = pname.split(".", 2)[2] if pname.startswith("blocks.") else pname  # "attn.wqkv.weight"
    if local in shard.ROW_PARALLEL_BIASES and s.rank:
        dst.zero_()  # added once, by rank 0
        return
    r = shard.rows(local, cfg, s)
    mine = r if r is not None else [(0, dst.shape[0])]  # None: every row (dst has them all)
    c = shard.cols(local, cfg, s)
    at = 0  # where each of the rank's row ranges starts in dst
    for a, b in mine:
        lo, hi = max(a, row0), min(b, row0 + rows)
        if lo < hi:
            part = t[perm[lo - row0:hi - row0]] if perm is not None else t[lo - row0:hi - row0]
            dst[at + lo - a:at + hi - a].copy_(part if c is None else part[:, c[0]:c[1]])
        at += b - a


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
