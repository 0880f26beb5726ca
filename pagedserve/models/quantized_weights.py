"""``--quantization int8`` applied to a loaded model, with the quantized weights cached.

After the checkpoint's weights are loaded (dequantized GGUF or safetensors, in the model
dtype), every ``Linear`` and the LM head get symmetric per-output-channel int8 copies
(``layers/quantization/int8.py``); a tied LM head gets its own, the embedding stays exact.
The int8 tensors are cached on disk next to the dequantized weights, keyed by the source's
fingerprint, the method, the model dtype and the format versions, and memory-mapped on a
warm start, so quantization runs once per checkpoint. Which kernel runs at which batch size
is then chosen for this CPU (``layers/quantization/selection.py``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
from torch import nn

from pagedserve import envs, platform
from pagedserve.config import ModelConfig
from pagedserve.layers.embedding import LMHead
from pagedserve.layers.linear import Linear
from pagedserve.layers.quantization import gemv
from pagedserve.layers.quantization.int8 import install_int8, quantize_layer_weight
from pagedserve.layers.quantization.kernels import Int8KernelPlan, weight_row_sums
from pagedserve.layers.quantization.selection import QuantizedWeight, choose_int8_plan
from pagedserve.models.weight_files import load_tensors, progress, save_tensors
from pagedserve.transformers_utils.utils import cache_root

logger = logging.getLogger(__name__)

# Part of the cache file name: bump it whenever the quantized tensors change (rounding,
# scale layout, names), so a stale cache is never reused.
QUANT_FORMAT_VERSION = 1
# Kernel plans measured on this machine, by CPU, threads, torch, dtype and shapes.
KERNEL_PLANS_FILE = "int8_kernel_plans.json"

Target = tuple[str, nn.Module, torch.Tensor, bool]  # (name, module, unquantized weight, is LM head)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _source_cache_dir(model_path: str) -> tuple[Path, str]:
    """The cache folder of a checkpoint and a tag of what its weights were derived by."""
    from pagedserve.models.gguf_loader import WEIGHTS_FORMAT_VERSION
    from pagedserve.transformers_utils.gguf_reader import file_fingerprint, gguf_cache_dir
    from pagedserve.transformers_utils.utils import safetensors_files

    if model_path.endswith(".gguf"):
        return gguf_cache_dir(model_path), f"w{WEIGHTS_FORMAT_VERSION}"
    digest = hashlib.sha256()
    for path in safetensors_files(model_path):
        digest.update(f"{path.name}:{file_fingerprint(path)};".encode())
    return cache_root() / "quantized" / f"{Path(model_path).name}-{digest.hexdigest()[:20]}", "st"


def quantized_weights_path(model_config: ModelConfig) -> Path:
    """Where the quantized weights of this checkpoint, method and dtype are cached."""
    folder, source_tag = _source_cache_dir(model_config.model_path)
    name = (
        f"{model_config.quantization}.v{QUANT_FORMAT_VERSION}.{source_tag}."
        f"{_dtype_name(model_config.dtype)}.safetensors"
    )
    return folder / name


def quantization_targets(model: nn.Module) -> list[Target]:
    """Every layer ``--quantization`` replaces: the linears and the LM head."""
    targets: list[Target] = []
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            targets.append((name, module, module.weight, False))
        elif isinstance(module, LMHead):
            weight = module._tied[0].weight if module.tied else module.weight
            targets.append((name, module, weight, True))
    return targets


def _expected_shapes(targets: list[Target]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, _, weight, _ in targets:
        shapes[f"{name}.qweight"] = tuple(weight.shape)
        shapes[f"{name}.weight_scale"] = (weight.shape[0],)
    return shapes


def _quantize_all(targets: list[Target]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    bar = progress(targets, "quantizing to int8", total=len(targets), unit="layer")
    for name, _, weight, _ in bar:
        qweight, scale = quantize_layer_weight(weight)
        tensors[f"{name}.qweight"] = qweight
        tensors[f"{name}.weight_scale"] = scale
    return tensors


def load_or_quantize(targets: list[Target], path: Path, source: str) -> dict[str, torch.Tensor]:
    """The targets' int8 tensors: memory-mapped from ``path``, or computed and cached there."""
    expected = _expected_shapes(targets)
    if path.exists():
        try:
            tensors, _ = load_tensors(path)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable quantized-weights cache %s: %s", path, exc)
        else:
            if {k: tuple(v.shape) for k, v in tensors.items()} == expected:
                return tensors
            logger.warning("quantized-weights cache %s does not fit the model; re-quantizing", path)
    start = time.perf_counter()
    logger.info("quantizing %d layers to int8 (once; cached in %s)", len(targets), path.parent)
    tensors = _quantize_all(targets)
    metadata = {"source": source, "method": "int8", "format_version": str(QUANT_FORMAT_VERSION)}
    try:
        save_tensors(path, tensors, metadata, desc="writing int8 weights cache")
    except OSError as exc:
        logger.warning("could not cache the quantized weights in %s: %s", path, exc)
    logger.info("quantized in %.1f s", time.perf_counter() - start)
    return tensors


def _benchmark_weights(
    targets: list[Target], tensors: dict[str, torch.Tensor]
) -> tuple[list[QuantizedWeight], QuantizedWeight | None]:
    """Decoder linears of the shape holding the most weights (one per layer), and the head."""
    groups: dict[tuple[int, ...], list[QuantizedWeight]] = {}
    head = None
    for name, _, weight, is_head in targets:
        qweight, scale = tensors[f"{name}.qweight"], tensors[f"{name}.weight_scale"]
        entry = QuantizedWeight(
            qweight, scale, scale.to(torch.bfloat16), weight,
            weight_row_sums(qweight) if is_head or gemv.load_gemv() is not None else None,
        )
        if is_head:
            head = entry
        else:
            groups.setdefault(tuple(weight.shape), []).append(entry)
    if not groups:
        return [], head
    shape = max(groups, key=lambda s: s[0] * s[1] * len(groups[s]))
    return groups[shape], head


def quantize_model(model: nn.Module, model_config: ModelConfig) -> str:
    """Quantize ``model`` (weights loaded) per ``model_config.quantization``; returns the
    banner's description of the kernels chosen."""
    if model_config.quantization != "int8":
        raise ValueError(f"unknown quantization {model_config.quantization!r}")
    if platform.device().type != "cpu":
        raise ValueError("int8 quantization runs on CPU only; use --quantization none")
    targets = quantization_targets(model)
    tensors = load_or_quantize(
        targets, quantized_weights_path(model_config), Path(model_config.model_path).name
    )
    linear_weights, head = _benchmark_weights(targets, tensors)
    plan: Int8KernelPlan = choose_int8_plan(
        linear_weights, head, model_config.dtype, override=envs.PAGEDSERVE_INT8_KERNELS,
        cache_path=cache_root() / KERNEL_PLANS_FILE,
    )
    for name, module, _, is_head in targets:
        schedule = plan.lm_head if is_head else plan.linear
        install_int8(
            module, tensors[f"{name}.qweight"], tensors[f"{name}.weight_scale"], schedule,
            lm_head=is_head, name=name,
        )
    return f"kernels {plan} ({plan.source})"
