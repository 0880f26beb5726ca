"""Small file helpers of the model-file code: the cache folder, JSON reads, atomic writes,
and the safetensors files of an HF checkpoint folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pagedserve import envs


def cache_root() -> Path:
    """pagedserve's cache folder: ``$PAGEDSERVE_CACHE_DIR``, default ``~/.cache/pagedserve``."""
    return Path(envs.PAGEDSERVE_CACHE_DIR)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def safetensors_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint's safetensors files (per the index when there is one)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index} names missing files: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"no *.safetensors weights in {folder}; expected model.safetensors (or shards "
            "with model.safetensors.index.json) next to config.json"
        )
    return files
