"""Text in and out through the `tokenizer.json` saved beside a checkpoint (the tokenizers library)."""

from __future__ import annotations

from pathlib import Path

from cpugen.errors import CpugenError


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _T

        try:
            self._tok = _T.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception
            raise CpugenError(f"{path}: cannot read tokenizer ({e})".splitlines()[0]) from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(checkpoint: Path | None) -> Tokenizer | None:
    if checkpoint is None:
        return None
    f = checkpoint / "tokenizer.json"
    return Tokenizer(f) if f.is_file() else None
