"""Layers vs their transformers counterparts, bit for bit where the math is the same."""

from __future__ import annotations

import pytest
import torch

from pagedserve.layers.embedding import VocabEmbedding
from pagedserve.layers.layernorm import GemmaRMSNorm, RMSNorm, StackedGemmaNorms
from pagedserve.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_emb


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
    # The models' path: q and k heads rotated together, as one [T, H + Hkv, D] tensor.
    qk = apply_rotary_emb(torch.cat((q, k), dim=1), ours.tables(positions, dtype))
    assert torch.equal(qk[:, :4], our_q) and torch.equal(qk[:, 4:], our_k)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_match_transformers_at_model_sizes(dtype: torch.dtype) -> None:
    """fp32 is bit for bit; bf16 (float32 accumulation by a different op order) is within
    one bf16 ulp of transformers, and identical almost everywhere."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    for shape in [(1, 640), (37, 640), (300, 4, 256)]:
        size = shape[-1]
        x = (torch.randn(*shape) * torch.rand(*shape[:-1], 1) * 8).to(dtype)
        weight = (torch.randn(size) * 0.5).to(dtype)
        for hf_cls, our_cls in ((LlamaRMSNorm, RMSNorm), (Gemma3RMSNorm, GemmaRMSNorm)):
            hf, ours = hf_cls(size, eps=1e-6).to(dtype), our_cls(size, eps=1e-6)
            with torch.no_grad():
                hf.weight.data = weight.clone()
                ours.weight.data = weight.clone()
                expected, actual = hf(x), ours(x)
            assert actual.dtype == expected.dtype == dtype
            if dtype == torch.float32:
                assert torch.equal(actual, expected)
                continue
            ulp = torch.finfo(dtype).eps * expected.float().abs().clamp(min=torch.finfo(dtype).tiny)
            assert ((actual.float() - expected.float()).abs() <= ulp).all()
            assert (actual == expected).float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_gemma_norms_equal_separate_norms(dtype: torch.dtype) -> None:
    q_norm, k_norm = GemmaRMSNorm(16, eps=1e-6), GemmaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.data = torch.randn(16).to(dtype)
        k_norm.weight.data = torch.randn(16).to(dtype)
    stacked = StackedGemmaNorms([(q_norm, 4), (k_norm, 2)])
    qk = (torch.randn(7, 6, 16) * 3).to(dtype)
    with torch.no_grad():
        out = stacked(qk)
        assert torch.equal(out[:, :4], q_norm(qk[:, :4]))
        assert torch.equal(out[:, 4:], k_norm(qk[:, 4:]))
        # Cached constants follow the weights: a reload (in place or a new tensor) is seen.
        k_norm.weight.copy_(torch.randn(16).to(dtype))
        assert torch.equal(stacked(qk)[:, 4:], k_norm(qk[:, 4:]))
        q_norm.weight.data = torch.randn(16).to(dtype)
        assert torch.equal(stacked(qk)[:, :4], q_norm(qk[:, :4]))


def test_norm_constants_follow_weight_changes() -> None:
    norm = GemmaRMSNorm(8)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.data = torch.zeros(8, dtype=torch.bfloat16)
        before = norm(x)
        norm.weight.fill_(1.0)  # in place: same storage, new version
        assert torch.equal(norm(x), (before.float() * 2).to(torch.bfloat16))


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
