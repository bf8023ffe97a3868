"""One config for every supported family (GPT-J, OPT, Llama/Mistral/Qwen2), loaded from data.

A model is named by a preset (`configs/<name>.json`, exact names only), a config JSON path, or a
Hugging Face checkpoint directory whose `config.json` is mapped onto `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cpugen.errors import CpugenError
from cpugen.model.activations import NAMES as ACTIVATIONS

FAMILIES = ("gptj", "opt", "llama")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # gptj | opt | llama: how checkpoint tensors are named
    vocab_size: int
    n_layer: int
    n_embd: int  # hidden size h
    n_head: int
    n_kv_head: int  # < n_head: grouped-query attention
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    mlp: str = "plain"  # plain: fc_out(act(fc_in x)) | glu: down(act(gate x) * up x)
    parallel_residual: bool = False  # GPT-J: x + attn(ln(x)) + mlp(ln(x))
    position: str = "rotary"  # rotary | learned
    position_offset: int = 0  # OPT's learned positions start at index 2
    rotary_dim: int = 0  # rotary on the first rotary_dim dims of each head
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    rope_interleaved: bool = False  # GPT-J rotates pairs (0,1),(2,3)..; Llama (i, i+d/2)
    sliding_window: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    source: str = ""  # the public config this one mirrors

    def __post_init__(self):
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {', '.join(FAMILIES)}, not {self.family!r}")
        for k in ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim",
                  "intermediate_size", "max_positions"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{k} must be a positive integer, not {v!r}")
        if problems:
            raise CpugenError(f"config {self.name!r}: " + "; ".join(problems))
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm must be layernorm or rmsnorm, not {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {', '.join(ACTIVATIONS)}, not {self.activation!r}")
        if self.mlp not in ("plain", "glu"):
            problems.append(f"mlp must be plain or glu, not {self.mlp!r}")
        if self.position not in ("rotary", "learned"):
            problems.append(f"position must be rotary or learned, not {self.position!r}")
        if self.position == "rotary" and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            problems.append(f"rotary_dim must be even and in 1..head_dim ({self.head_dim}), not {self.rotary_dim!r}")
        if problems:
            raise CpugenError(f"config {self.name!r}: " + "; ".join(problems))

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def with_layers(self, n: int | None) -> "ModelConfig":
        """The first n blocks of this model (the reference ran "1/3 of the workflow" this way)."""
        if n is None:
            return self
        if n <= 0 or n > self.n_layer:
            raise CpugenError(f"--layers must be in 1..{self.n_layer} for {self.name}, not {n}")
        return dataclasses.replace(self, n_layer=n)


# --- presets -------------------------------------------------------------------------------------
def preset_dir():
    """configs/ ships inside the wheel as the package `cpugen.configs`; in a source checkout
    (cwd on sys.path, editable install) it is the folder beside the package."""
    try:
        return resources.files("cpugen.configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in preset_dir().iterdir() if p.name.endswith(".json"))


def from_dict(d: dict, where: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise CpugenError(f"{where}: a model config must be a JSON object")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CpugenError(f"{where}: unknown config keys {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    d = dict(d)
    d.setdefault("name", Path(where).stem)
    try:
        return ModelConfig(**d)
    except TypeError as e:  # a required key is missing
        raise CpugenError(f"{where}: {e}".replace("ModelConfig.__init__() ", "")) from None


def from_name(name: str) -> ModelConfig:
    f = preset_dir() / f"{name}.json"
    if not f.is_file():
        raise CpugenError(f"unknown model {name!r}: use a preset ({', '.join(preset_names())}), "
                          "a config JSON path or a checkpoint directory")
    return from_dict(json.loads(f.read_text()), f"preset {name}")
