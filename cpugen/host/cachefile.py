"""The JSON files of measurements kept in CPUGEN_CACHE beside the kernels' builds (roofline.json,
layout.json): one entry per host key, read whole, written by replacing the file."""

from __future__ import annotations

import json
from pathlib import Path


def host_key(threads: int) -> str:
    """What a measurement of this host holds for: the CPU, the threads, torch's version, and the
    page size ("pages": limits read before cpugen used huge pages came from 4 KiB pages, and are
    measured again)."""
    import torch

    from cpugen.host.cpu import cpu_info
    from cpugen.host.memory import thp_mode

    return f"{cpu_info()['cpu']}|{threads}|{torch.__version__}|pages={'2M' if thp_mode() in ('always', 'madvise') else '4K'}"


def read(path: Path) -> dict:
    """The file's entries ({} where it is missing, unreadable or not JSON)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def put(path: Path, key: str, value) -> bool:
    """Sets one entry, the others kept; False where the file cannot be written (a read-only
    cache: measured again next time)."""
    path = Path(path)
    data = read(path)
    data[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        return False
    return True
