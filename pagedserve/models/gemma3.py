"""Gemma 3 (text): Gemma RMSNorm (1 + w, float32), scaled embedding, GELU-tanh gated MLP,
q/k norm, sandwich norms around attention and MLP, interleaved sliding-window layers with
their own RoPE base, ``query_pre_attn_scalar`` scaling, optional softcaps, tied LM head."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.layers.attention import Attention
from pagedserve.layers.embedding import LMHead, VocabEmbedding
from pagedserve.layers.layernorm import GemmaRMSNorm, StackedGemmaNorms
from pagedserve.layers.linear import Linear, QKVLinear
from pagedserve.layers.rotary import RopeTables, RotaryEmbedding, apply_rotary_emb
from pagedserve.models.llama import LlamaMLP, head_dim_of
from pagedserve.models.utils import CausalLMBase, layer_sliding_window


def _layer_type(config: Any, layer_idx: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return "full_attention"
    return str(layer_types[layer_idx])


class Gemma3Attention(nn.Module):
    """Self-attention with Gemma q/k norms and ``query_pre_attn_scalar ** -0.5`` scaling."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = head_dim_of(config)
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=bias
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        # q and k heads are adjacent in the fused qkv output: normalized (each with its
        # own weight) and rotated in one call each.
        self.qk_norm = StackedGemmaNorms(
            [(self.q_norm, self.num_heads), (self.k_norm, self.num_kv_heads)]
        )
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with bidirectional attention is not supported")
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=float(config.query_pre_attn_scalar) ** -0.5,
            sliding_window=layer_sliding_window(config, layer_idx),
            logit_softcap=getattr(config, "attn_logit_softcapping", None),
        )

    def forward(self, hidden_states: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        qk_size = self.qkv_proj.q_size + self.qkv_proj.kv_size
        qk = qkv[:, :qk_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = apply_rotary_emb(self.qk_norm(qk), rope)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        return self.o_proj(self.attn(q, k, qkv[:, qk_size:]))


class Gemma3DecoderLayer(nn.Module):
    """Decoder layer with pre/post norms around both attention and MLP."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = _layer_type(config, layer_idx)
        self.self_attn = Gemma3Attention(config, layer_idx)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_activation)
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        # Residual adds write into the fresh norm outputs (same values as residual + x).
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), rope)
        hidden_states = self.post_attention_layernorm.forward_add(hidden_states, residual)
        residual = hidden_states
        hidden_states = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return self.post_feedforward_layernorm.forward_add(hidden_states, residual)


class Gemma3TextModel(nn.Module):
    """Scaled embedding, decoder layers, final norm; one RoPE table per layer type."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            config.vocab_size, config.hidden_size, scale=config.hidden_size**0.5
        )
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layer_types = sorted({layer.layer_type for layer in self.layers})
        self.rotary_embs = nn.ModuleDict(
            {t: RotaryEmbedding(config, head_dim_of(config), layer_type=t) for t in self.layer_types}
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        dtype = hidden_states.dtype
        tables = {t: rope.tables(positions, dtype) for t, rope in self.rotary_embs.items()}
        for layer in self.layers:
            hidden_states = layer(hidden_states, tables[layer.layer_type])
        return self.norm(hidden_states)


class Gemma3ForCausalLM(CausalLMBase):
    """Gemma 3 text model with a tied LM head."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.model = Gemma3TextModel(config)
        self.lm_head = LMHead(
            config.vocab_size,
            config.hidden_size,
            tied_embedding=self.model.embed_tokens if self.tie_word_embeddings else None,
            final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
        )
