"""``(name, tensor)`` pairs from safetensors checkpoints (HF folders)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


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


def iterate_safetensors_file(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            yield name, f.get_tensor(name)


def iterate_safetensors(folder: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of an HF checkpoint folder, file by file."""
    for path in safetensors_files(folder):
        yield from iterate_safetensors_file(path)
