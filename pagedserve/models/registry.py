"""HF architecture name -> model class.

The front end's view of the same set (``SUPPORTED_ARCHITECTURES``, and the model_type ->
architecture table ``MODEL_TYPE_TO_ARCHITECTURE``) lives in
``pagedserve.transformers_utils.config``, which imports no model code.
"""

from __future__ import annotations

import importlib

from torch import nn

from pagedserve.transformers_utils.config import (
    MODEL_TYPE_TO_ARCHITECTURE,
    SUPPORTED_ARCHITECTURES,
)

__all__ = [
    "MODEL_TYPE_TO_ARCHITECTURE",
    "SUPPORTED_ARCHITECTURES",
    "get_model_class",
    "supported_architectures",
]

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("pagedserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedserve.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagedserve.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagedserve.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("pagedserve.models.gemma3", "Gemma3ForCausalLM"),
}

if set(_MODELS) != set(SUPPORTED_ARCHITECTURES):  # one list, two views: keep them equal
    raise ImportError(
        "pagedserve.models.registry and pagedserve.transformers_utils.config disagree on the "
        f"supported architectures: {sorted(_MODELS)} vs {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The model class for an HF architecture name; ValueError lists the supported ones."""
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(supported_architectures())}"
        )
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)
