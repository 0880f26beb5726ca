"""Build a model for a ModelConfig and load its weights (safetensors folder or GGUF)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from pagedserve import platform
from pagedserve.config import ModelConfig
from pagedserve.models.registry import get_model_class
from pagedserve.models.utils import default_torch_dtype

logger = logging.getLogger(__name__)


def iterate_weights(model_path: str, hf_config: object, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs from a GGUF file or an HF safetensors folder."""
    if model_path.endswith(".gguf"):
        from pagedserve.models.gguf_loader import iterate_gguf_weights

        return iterate_gguf_weights(model_path, hf_config, dtype)
    from pagedserve.models.safetensors_loader import iterate_safetensors

    return iterate_safetensors(model_path)


def build_model(architecture: str, hf_config: object, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """An unloaded model (uninitialized parameters) in ``dtype`` on ``device``."""
    model_class = get_model_class(architecture)
    with default_torch_dtype(dtype), torch.device(device):
        return model_class(hf_config)


def get_model(model_config: ModelConfig) -> nn.Module:
    """Build ``model_config.architecture``, load its weights in ``model_config.dtype`` on
    ``platform.device()``, quantize it per ``model_config.quantization``, and return it in
    eval mode."""
    start = time.perf_counter()
    device = platform.device()
    model = build_model(model_config.architecture, model_config.hf_config, model_config.dtype, device)
    model.load_weights(iterate_weights(model_config.model_path, model_config.hf_config, model_config.dtype))
    if model_config.quantization != "none":
        from pagedserve.models.quantized_weights import quantize_model

        # What the banner says about it (kernels chosen for this CPU).
        model.quantization_info = quantize_model(model, model_config)
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "loaded %s (%s, %s, quantization %s) on %s in %.2f s",
        model_config.architecture, model_config.model_path, model_config.dtype,
        model_config.quantization, device,
        time.perf_counter() - start,
    )
    return model
