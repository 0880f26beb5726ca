"""GGUF weights: dequantization to HF-named tensors, the one place where GGUF storage
quirks are undone, and an on-disk cache of the dequantized weights (safetensors, keyed by
the file's fingerprint and a format version) so warm starts take seconds instead of
re-dequantizing.

The header/metadata reader lives in ``pagedserve.transformers_utils.gguf_reader`` (the API
process needs it without model code); blocks are dequantized with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pagedserve.models.weight_files import progress, save_tensors
from pagedserve.transformers_utils.gguf_reader import (
    GGUFFile,
    GGUFTensorInfo,
    file_fingerprint,
    gguf_cache_dir,
    read_gguf,
)

__all__ = [
    "GGUFFile",
    "GGUFTensorInfo",
    "WEIGHTS_FORMAT_VERSION",
    "cached_weights_file",
    "cached_weights_path",
    "convert_gguf_weights",
    "dequantize_tensor",
    "file_fingerprint",
    "gguf_cache_dir",
    "gguf_to_hf_name_map",
    "iterate_gguf_weights",
    "read_gguf",
    "undo_gguf_quirks",
]

logger = logging.getLogger(__name__)

# Part of the dequantized-weights cache file name: bump it whenever the tensors this module
# produces change (names, quirks, dequantization), so stale caches are never reused.
WEIGHTS_FORMAT_VERSION = 1

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
    bar = progress(gguf_file.tensors, "dequantizing GGUF", total=len(gguf_file.tensors), unit="tensor")
    for info in bar:
        hf_name = name_map.get(info.name)
        if hf_name is None:
            logger.debug("skipping GGUF tensor %s (no transformers counterpart)", info.name)
            continue
        weights = undo_gguf_quirks(arch, info.name, dequantize_tensor(mm, info), hf_config)
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    return tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cached_weights_path(path: str | os.PathLike[str], dtype: torch.dtype) -> Path:
    """Where the dequantized weights of this GGUF file in ``dtype`` are cached: the file's
    cache folder (keyed by its content fingerprint) and the weights format version."""
    name = f"weights.v{WEIGHTS_FORMAT_VERSION}.{_dtype_name(dtype)}.safetensors"
    return gguf_cache_dir(path) / name


def cached_weights_file(path: str | os.PathLike[str], hf_config: Any, dtype: torch.dtype) -> Path:
    """A safetensors file with the GGUF's weights in ``dtype``; dequantized on first use."""
    target = cached_weights_path(path, dtype)
    if target.exists():
        return target
    start = time.perf_counter()
    logger.info("dequantizing %s to %s (cached under %s)", path, dtype, target.parent)
    tensors = {k: v.to(dtype).contiguous() for k, v in convert_gguf_weights(path, hf_config).items()}
    metadata = {
        "source": os.path.basename(str(path)),
        "format_version": str(WEIGHTS_FORMAT_VERSION),
    }
    save_tensors(target, tensors, metadata, desc="writing dequantized weights cache")
    logger.info("dequantized GGUF weights in %.1f s", time.perf_counter() - start)
    return target


def iterate_gguf_weights(
    path: str | os.PathLike[str], hf_config: Any, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs for a GGUF file, from the dequantized cache."""
    from pagedserve.models.safetensors_loader import iterate_safetensors_file

    yield from iterate_safetensors_file(cached_weights_file(path, hf_config, dtype))
