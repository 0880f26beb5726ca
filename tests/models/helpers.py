"""Loading our model and transformers' twin from the same checkpoint (float32)."""

from __future__ import annotations

import torch

from pagedserve.config import ModelConfig
from pagedserve.models.loader import get_model
from pagedserve.transformers_utils.resolve import ResolvedModel, resolve_model


def model_config_for(resolved: ResolvedModel, dtype: torch.dtype = torch.float32) -> ModelConfig:
    return ModelConfig(
        model=resolved.model_path,
        model_path=resolved.model_path,
        tokenizer_path=resolved.tokenizer_path,
        hf_config=resolved.hf_config,
        architecture=resolved.architecture,
        dtype=dtype,
        dtype_reason="test",
        max_model_len=int(getattr(resolved.hf_config, "max_position_embeddings", 512)),
        eos_token_ids=resolved.eos_token_ids,
    )


def load_ours(path: str | None, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ResolvedModel]:
    resolved = resolve_model(path)
    return get_model(model_config_for(resolved, dtype)), resolved


def load_hf(folder: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = hf_model(input_ids=torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()
