"""Weight cache files: safetensors written with a progress bar, read memory-mapped.

The format is plain safetensors (an 8-byte header length, a JSON header, the raw bytes),
so the files stay readable by ``safetensors`` and transformers; it is written here, tensor
by tensor, so a cold start can show its progress, and read here as views of a private
(copy-on-write) memory map, so a warm start neither copies nor re-computes anything.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
    torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def progress(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """A tqdm bar over ``iterable`` on an interactive stderr (none in logs and tests)."""
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False,
                    dynamic_ncols=True)


def save_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], desc: str
) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically, with a progress bar.

    Larger elements first, so every tensor starts at a multiple of its element size
    (safetensors allows no padding between tensors) and maps without a copy.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    ordered = sorted(tensors.items(), key=lambda item: -item[1].element_size())
    offset = 0
    for name, tensor in ordered:
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be cached")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for _, tensor in progress(ordered, desc, total=len(ordered), unit="tensor"):
                data = tensor.detach().cpu().contiguous()
                f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file as views of a private memory map, and its metadata.

    Pages come from the page cache when touched; nothing is read up front.
    """
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + header_size
    if len(mapped):
        buffer = torch.frombuffer(mapped, dtype=torch.uint8)
    else:
        buffer = torch.empty(0, dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = _TORCH_DTYPES[entry["dtype"]]
        raw = buffer[base + begin : base + end]
        if (base + begin) % raw.new_empty(0, dtype=dtype).element_size():
            raw = raw.clone()  # misaligned (a file written elsewhere): copy this one
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors, dict(metadata)
