"""What `--model` names: a preset (configs/<name>.json), a config JSON path (cpugen's keys, or a bare
Hugging Face config.json: random weights of that shape), or a checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

from cpugen.errors import CpugenError
from cpugen.model.config import ModelConfig, from_dict, from_name
from cpugen.model.hf_config import config_from_hf, config_from_hf_dict


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CpugenError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise CpugenError(f"{path}: cannot read ({e.strerror})") from None


def resolve(spec: str, layers: int | None = None) -> tuple[ModelConfig, Path | None]:
    """`--model` (and `--layers`) as given -> (config, checkpoint directory or None for random weights)."""
    cfg, checkpoint = _resolve(spec)
    return cfg.with_layers(layers), checkpoint


def _resolve(spec: str) -> tuple[ModelConfig, Path | None]:
    p = Path(spec)
    if p.is_dir():
        return config_from_hf(p), p
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise CpugenError(f"{spec}: no such file")
        d = _read_json(p)
        if "model_type" in d or "architectures" in d:  # a bare HF config.json: random weights of that shape
            return config_from_hf_dict(d, str(p)), None
        return from_dict(d, str(p)), None
    if "/" in spec or spec.startswith("."):
        raise CpugenError(f"{spec}: no such file or directory")
    return from_name(spec), None
