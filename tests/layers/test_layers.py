"""Layers vs their transformers counterparts, bit for bit where the math is the same."""

from __future__ import annotations

import pytest
import torch

from pagedserve.layers.embedding import VocabEmbedding
from pagedserve.layers.layernorm import GemmaRMSNorm, RMSNorm
from pagedserve.layers.rotary import RotaryEmbedding, apply_rotary


def _llama_config(rope_parameters: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=4096,
        rope_parameters=rope_parameters,
    )


ROPES = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
]


@pytest.mark.parametrize("rope", ROPES, ids=[r["rope_type"] for r in ROPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_transformers(rope: dict, dtype: torch.dtype) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    config = _llama_config(rope)
    hf_rope = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(config, head_dim=16)
    positions = torch.tensor([0, 1, 5, 77, 1023, 3000])
    x = torch.randn(1, len(positions), 16, dtype=dtype)
    hf_cos, hf_sin = hf_rope(x, positions[None])
    cos, sin = ours(positions, dtype)
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    q = torch.randn(len(positions), 4, 16, dtype=dtype)
    k = torch.randn(len(positions), 2, 16, dtype=dtype)
    hf_q, hf_k = hf_apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    our_q, our_k = apply_rotary(q, k, cos, sin)
    assert torch.equal(our_q, hf_q[0].transpose(0, 1)) and torch.equal(our_k, hf_k[0].transpose(0, 1))


def test_dynamic_rope_is_rejected() -> None:
    config = _llama_config({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="not supported"):
        RotaryEmbedding(config, head_dim=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_transformers(dtype: torch.dtype) -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(5, 32, dtype=dtype) * 3
    weight = torch.randn(32, dtype=dtype)
    hf_llama, ours_llama = LlamaRMSNorm(32, eps=1e-5).to(dtype), RMSNorm(32, eps=1e-5)
    hf_gemma, ours_gemma = Gemma3RMSNorm(32, eps=1e-6).to(dtype), GemmaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        for module in (hf_llama, ours_llama, hf_gemma, ours_gemma):
            module.weight.data = weight.clone()
        assert torch.equal(ours_llama(x), hf_llama(x))
        assert torch.equal(ours_gemma(x), hf_gemma(x))


def test_scaled_embedding_rounds_like_transformers() -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    weight = torch.randn(10, 640, dtype=torch.bfloat16)
    hf = Gemma3TextScaledWordEmbedding(10, 640, 0, embed_scale=640**0.5).to(torch.bfloat16)
    hf.weight.data = weight.clone()
    hf.embed_scale = torch.tensor(640**0.5)
    ours = VocabEmbedding(10, 640, scale=640**0.5)
    ours.weight.data = weight.clone()
    ids = torch.tensor([0, 3, 9])
    with torch.no_grad():
        assert torch.equal(ours(ids), hf(ids))
