"""Scoped forward context: how attention layers find metadata and their KV cache.

Layers call ``get_forward_context()``; the model runner wraps each forward in
``set_forward_context(...)``. Nesting is refused so a stale context can never leak.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata


@dataclass
class ForwardContext:
    """Per-forward state: metadata, and one KV cache tensor per attention layer."""

    attn_metadata: CommonAttentionMetadata
    # kv_caches[layer_idx]: shaped as the backend's get_kv_cache_shape (torch backend:
    # [2, num_blocks, block_size, num_kv_heads, head_dim])
    kv_caches: list[torch.Tensor]
    # Backend-specific prepared metadata, built once per forward (e.g. gather indices).
    backend_metadata: Any = None


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    if _current is not None:
        raise RuntimeError("set_forward_context does not nest: a forward is already running")
    _current = context
    try:
        yield context
    finally:
        _current = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: call the model inside set_forward_context()")
    return _current
