"""Qwen3: the Llama layout plus per-head RMSNorm on q and k (before RoPE), no qkv bias."""

from __future__ import annotations

from typing import Any

from pagedserve.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models."""

    @staticmethod
    def _attention_options(config: Any) -> tuple[bool, bool, bool]:
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias, True
