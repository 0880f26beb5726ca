"""The attention backend protocol and backend selection.

A backend declares its KV cache layout (``get_kv_cache_shape``, from which the model
runner sizes and allocates the cache), prepares its own metadata once per forward
from the :class:`CommonAttentionMetadata` (``build_metadata``), and computes attention
for one layer (``forward``). The model runner calls ``build_metadata`` once per step
and stores the result in ``ForwardContext.backend_metadata``; attention layers pass it
back to ``forward``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata


class AttentionBackend(Protocol):
    """What every attention backend implements."""

    name: str

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """Shape of one layer's KV cache tensor (K and V stacked on dim 0).

        Proportional to ``num_blocks``: the model runner sizes the cache from it.
        """
        ...

    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Backend metadata for one forward pass, shared by all layers."""
        ...

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        sliding_window: int | None,
        scale: float,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        """Store ``key``/``value`` ``[T, Hkv, D]`` into ``kv_cache`` by slot mapping, then
        attend ``query [T, H, D]`` over each request's context; returns ``[T, H, D]``."""
        ...


@lru_cache(maxsize=1)
def get_attn_backend() -> AttentionBackend:
    """The backend for this platform (the torch reference backend everywhere for now)."""
    from pagedserve.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
