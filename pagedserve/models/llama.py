"""Llama-family decoders: Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm).

Module names mirror transformers (``model.layers.N.self_attn...``) with fused
``qkv_proj`` and ``gate_up_proj``; ``load_weights`` routes checkpoint names into them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.layers.activation import get_gated_activation
from pagedserve.layers.attention import Attention
from pagedserve.layers.embedding import LMHead, VocabEmbedding
from pagedserve.layers.layernorm import RMSNorm
from pagedserve.layers.linear import Linear, MergedLinear, QKVLinear
from pagedserve.layers.rotary import RopeTables, RotaryEmbedding, apply_rotary_emb
from pagedserve.models.utils import CausalLMBase, layer_sliding_window


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class LlamaMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` with a fused gate_up projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_gated_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """Self-attention with fused qkv, optional per-head q/k RMSNorm (Qwen3), RoPE."""

    def __init__(
        self, config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool
    ) -> None:
        super().__init__()
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias=qkv_bias
        )
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attn = Attention(
            layer_idx,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=self.head_dim**-0.5,
            sliding_window=layer_sliding_window(config, layer_idx),
        )

    def forward(self, hidden_states: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.qkv_proj(hidden_states)
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qk_norm:
            q, k, v = self.qkv_proj.split(qkv)
            q = apply_rotary_emb(self.q_norm(q.reshape(num_tokens, num_heads, head_dim)), rope)
            k = apply_rotary_emb(self.k_norm(k.reshape(num_tokens, num_kv_heads, head_dim)), rope)
            return self.o_proj(self.attn(q, k, v))
        # q and k heads are adjacent in the fused output: rotate them in one call.
        qk_size = self.qkv_proj.q_size + self.qkv_proj.kv_size
        qk = qkv[:, :qk_size].view(num_tokens, num_heads + num_kv_heads, head_dim)
        qk = apply_rotary_emb(qk, rope)
        return self.o_proj(self.attn(qk[:, :num_heads], qk[:, num_heads:], qkv[:, qk_size:]))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention and MLP, each with a residual."""

    def __init__(self, config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias, o_bias, qk_norm)
        self.mlp = LlamaMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        residual = hidden_states
        hidden_states = residual + self.self_attn(self.input_layernorm(hidden_states), rope)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias, o_bias, qk_norm)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        rope = self.rotary_emb.tables(positions, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rope)
        return self.norm(hidden_states)


class LlamaForCausalLM(CausalLMBase):
    """Llama (and the architectures that share its layout)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        qkv_bias, o_bias, qk_norm = self._attention_options(config)
        self.model = LlamaModel(config, qkv_bias, o_bias, qk_norm)
        self.lm_head = LMHead(
            config.vocab_size,
            config.hidden_size,
            tied_embedding=self.model.embed_tokens if self.tie_word_embeddings else None,
            final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
        )

    @staticmethod
    def _attention_options(config: Any) -> tuple[bool, bool, bool]:
        """(qkv bias, o_proj bias, q/k norm)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias, False


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama layout; ``sliding_window`` (when set) applies to every layer."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: bias on q/k/v (not on o_proj)."""

    @staticmethod
    def _attention_options(config: Any) -> tuple[bool, bool, bool]:
        return True, False, False
