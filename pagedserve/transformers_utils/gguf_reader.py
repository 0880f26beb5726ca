"""GGUF metadata: a fast reader of a file's header, metadata and tensor index (no tensor
data), the file's content fingerprint, and the cache folder keyed by it.

``gguf.GGUFReader`` builds numpy views for every metadata element (seconds for a 262k
token vocabulary), so the header is parsed here directly. Dequantizing tensors is the
engine core's job (``pagedserve.models.gguf_loader``).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pagedserve.transformers_utils.utils import cache_root

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types -> struct format (8 = string, 9 = array).
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file (``dims`` in GGML order: fastest first)."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file


@dataclass
class GGUFFile:
    """Parsed metadata and tensor index of a GGUF file."""

    path: str
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


# GGML tensor types that hold plain numbers (F32, F16, I8, I16, I32, I64, F64, BF16);
# every other type is a block-quantized format (Q4_K, Q8_0, ...).
_UNQUANTIZED_GGML_TYPES = frozenset({0, 1, 24, 25, 26, 27, 28, 30})


def has_quantized_weights(gguf_file: GGUFFile) -> bool:
    """Whether any matrix of the file is stored block-quantized (as in a Q4_K_M file)."""
    return any(
        len(t.dims) >= 2 and t.ggml_type not in _UNQUANTIZED_GGML_TYPES for t in gguf_file.tensors
    )


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.f.read(size))[0]

    def string(self) -> str:
        length = self.scalar("<Q")
        return self.f.read(length).decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            fmt = _SCALAR_FORMATS[item_type]
            size = struct.calcsize(fmt)
            return np.frombuffer(self.f.read(size * count), dtype=np.dtype(fmt)).tolist()
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"corrupt GGUF: unknown metadata value type {value_type}")
        return self.scalar(_SCALAR_FORMATS[value_type])


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor index (no tensor data)."""
    path = str(path)
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        reader = _Reader(f)
        version = reader.scalar("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need >= 2)")
        num_tensors = reader.scalar("<Q")
        num_kv = reader.scalar("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("<I"))
        raw_tensors = []
        for _ in range(num_tensors):
            name = reader.string()
            num_dims = reader.scalar("<I")
            dims = tuple(reader.scalar("<Q") for _ in range(num_dims))
            ggml_type = reader.scalar("<I")
            offset = reader.scalar("<Q")
            raw_tensors.append((name, dims, ggml_type, offset))
        alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = f.tell()
        data_start += (-data_start) % alignment
    tensors = [GGUFTensorInfo(n, d, t, data_start + o) for n, d, t, o in raw_tensors]
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def file_fingerprint(path: str | os.PathLike[str], chunk_bytes: int = 4 << 20) -> str:
    """A quick content key: the file size plus sha256 of three ``chunk_bytes`` chunks (start,
    middle, end), as 20 hex digits. Neither the path nor the mtime is part of it; a change
    of the same size that touches none of the three chunks would go unnoticed."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for start in (0, max(0, size // 2 - chunk_bytes // 2), max(0, size - chunk_bytes)):
            f.seek(start)
            digest.update(f.read(chunk_bytes))
    return digest.hexdigest()[:20]


def gguf_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Cache folder for everything derived from this GGUF file (config, tokenizer, weights)."""
    stem = Path(path).name.removesuffix(".gguf")
    return cache_root() / "gguf" / f"{stem}-{file_fingerprint(path)}"
