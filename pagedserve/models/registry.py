"""HF architecture name -> model class."""

from __future__ import annotations

import importlib

from torch import nn

# architecture -> (module, class)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("pagedserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("pagedserve.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("pagedserve.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("pagedserve.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("pagedserve.models.gemma3", "Gemma3ForCausalLM"),
}

# HF model_type -> architecture, for configs without ``architectures`` (e.g. from GGUF).
MODEL_TYPE_TO_ARCHITECTURE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


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
