"""Which architectures pagedserve runs, and the architecture named by an HF config.

The model classes live in ``pagedserve.models.registry`` (engine core side); this table is
the front end's view of the same set, so resolving a model never imports model code.
"""

from __future__ import annotations

from typing import Any

# HF model_type -> architecture, for configs without ``architectures`` (e.g. from GGUF).
MODEL_TYPE_TO_ARCHITECTURE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

# Every architecture pagedserve.models.registry has a class for.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(set(MODEL_TYPE_TO_ARCHITECTURE.values())))


def check_architecture(architecture: str) -> str:
    """``architecture`` when pagedserve supports it; ValueError listing the supported ones."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return architecture


def architecture_of(config: Any) -> str:
    """The architecture an HF config names (``architectures[0]``, else by ``model_type``)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return str(architectures[0])
    model_type = getattr(config, "model_type", "")
    if model_type in MODEL_TYPE_TO_ARCHITECTURE:
        return MODEL_TYPE_TO_ARCHITECTURE[model_type]
    raise ValueError(
        f"cannot tell the architecture of model_type {model_type!r}; supported model types: "
        f"{', '.join(sorted(MODEL_TYPE_TO_ARCHITECTURE))}"
    )
