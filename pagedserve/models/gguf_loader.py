"""GGUF files: a fast metadata/tensor-index reader, dequantization to HF-named tensors,
the one place where GGUF storage quirks are undone, and an on-disk cache of the
dequantized weights (safetensors, keyed by the file's fingerprint) so warm starts take
seconds instead of re-dequantizing.

``gguf.GGUFReader`` builds numpy views for every metadata element (seconds for a 262k
token vocabulary), so metadata and the tensor index are parsed here directly; blocks are
dequantized with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from pagedserve.models.utils import cache_root

logger = logging.getLogger(__name__)

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
    """A quick content key: size plus sha256 of chunks at the start, middle and end."""
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


# ---------------------------------------------------------------------------------------
# Quirks: how llama.cpp stores some tensors differently from transformers. One place.


def _reverse_llama_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def undo_gguf_quirks(
    gguf_arch: str, gguf_name: str, weights: np.ndarray, hf_config: Any
) -> np.ndarray:
    """Convert a dequantized GGUF tensor to transformers' convention (as transformers does).

    - ``llama`` (also Mistral GGUFs): q/k projection rows are permuted for llama.cpp's
      interleaved RoPE; reverse the permutation.
    - ``gemma2``/``gemma3``: every ``*norm.weight`` is stored as ``1 + w``; subtract 1.
    """
    if gguf_arch == "llama":
        num_heads = int(hf_config.num_attention_heads)
        num_kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or num_heads)
        if ".attn_q." in gguf_name:
            return _reverse_llama_permute(weights, num_heads)
        if ".attn_k." in gguf_name:
            return _reverse_llama_permute(weights, num_kv_heads)
    if gguf_arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
        return weights - 1
    return weights


# ---------------------------------------------------------------------------------------


def _hf_parameter_names(hf_config: Any) -> list[str]:
    """transformers' state-dict names for this config (model built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return list(model.state_dict().keys())


def gguf_to_hf_name_map(gguf_arch: str, hf_config: Any) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name (via gguf-py's tensor name map)."""
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), None)
    if arch is None:
        raise ValueError(f"GGUF architecture {gguf_arch!r} is unknown to the gguf package")
    name_map = gguf.get_tensor_name_map(arch, int(hf_config.num_hidden_layers))
    mapping: dict[str, str] = {}
    for hf_name in _hf_parameter_names(hf_config):
        base, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            base, _, leaf = hf_name.rpartition(".")
            suffix = "." + leaf
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            mapping.setdefault(gguf_name + suffix, hf_name)
    return mapping


def dequantize_tensor(mm: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """Float32 array in transformers' shape (GGML dims reversed)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(info.ggml_type)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = tuple(reversed(info.dims))
    num_elements = int(np.prod(shape))
    num_bytes = num_elements // block_size * type_size
    row_bytes = info.dims[0] // block_size * type_size
    raw = mm[info.offset : info.offset + num_bytes].reshape(*shape[:-1], row_bytes)
    out = gguf.quants.dequantize(raw, qtype)
    return np.asarray(out, dtype=np.float32).reshape(shape)


def convert_gguf_weights(path: str | os.PathLike[str], hf_config: Any) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF file, dequantized to float32, HF-named, quirks undone."""
    gguf_file = read_gguf(path)
    arch = gguf_file.architecture
    name_map = gguf_to_hf_name_map(arch, hf_config)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, torch.Tensor] = {}
    for info in gguf_file.tensors:
        hf_name = name_map.get(info.name)
        if hf_name is None:
            logger.debug("skipping GGUF tensor %s (no transformers counterpart)", info.name)
            continue
        weights = undo_gguf_quirks(arch, info.name, dequantize_tensor(mm, info), hf_config)
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cached_weights_file(path: str | os.PathLike[str], hf_config: Any, dtype: torch.dtype) -> Path:
    """A safetensors file with the GGUF's weights in ``dtype``; dequantized on first use."""
    from safetensors.torch import save_file

    target = gguf_cache_dir(path) / f"weights.{_dtype_name(dtype)}.safetensors"
    if target.exists():
        return target
    start = time.perf_counter()
    logger.info("dequantizing %s to %s (cached under %s)", path, dtype, target.parent)
    tensors = {k: v.to(dtype).contiguous() for k, v in convert_gguf_weights(path, hf_config).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"source": os.path.basename(str(path))})
    os.replace(tmp, target)
    logger.info("dequantized GGUF weights in %.1f s", time.perf_counter() - start)
    return target


def iterate_gguf_weights(
    path: str | os.PathLike[str], hf_config: Any, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs for a GGUF file, from the dequantized cache."""
    from pagedserve.models.safetensors_loader import iterate_safetensors_file

    yield from iterate_safetensors_file(cached_weights_file(path, hf_config, dtype))
