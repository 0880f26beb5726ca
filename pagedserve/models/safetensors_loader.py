"""``(name, tensor)`` pairs from safetensors checkpoints (HF folders)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from pagedserve.transformers_utils.utils import safetensors_files

__all__ = ["iterate_safetensors", "iterate_safetensors_file", "safetensors_files"]


def iterate_safetensors_file(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            yield name, f.get_tensor(name)


def iterate_safetensors(folder: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """All tensors of an HF checkpoint folder, file by file."""
    for path in safetensors_files(folder):
        yield from iterate_safetensors_file(path)
