"""The attention layer: per-layer head geometry, reads its KV cache from the forward context."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.attention.backend import AttentionBackend, get_attn_backend
from pagedserve.forward_context import get_forward_context


class Attention(nn.Module):
    """Paged attention of one decoder layer (after q/k/v projection and RoPE).

    ``forward(query [T, H*D], key [T, Hkv*D], value [T, Hkv*D]) -> [T, H*D]``. The KV
    cache is ``get_forward_context().kv_caches[layer_idx]``; the backend metadata is the
    context's ``backend_metadata`` (built here on first use when the runner did not).
    """

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
            )
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.backend = backend if backend is not None else get_attn_backend()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if ctx.backend_metadata is None:
            ctx.backend_metadata = self.backend.build_metadata(ctx.attn_metadata)
        num_tokens = query.shape[0]
        out = self.backend.forward(
            query.view(num_tokens, self.num_heads, self.head_dim),
            key.view(num_tokens, self.num_kv_heads, self.head_dim),
            value.view(num_tokens, self.num_kv_heads, self.head_dim),
            ctx.kv_caches[self.layer_idx],
            ctx.backend_metadata,
            self.sliding_window,
            self.scale,
            self.logit_softcap,
        )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, scale={self.scale:.4g}, sliding_window={self.sliding_window}"
        )
