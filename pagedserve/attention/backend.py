"""The attention backend protocol and backend selection.

A backend declares its KV cache layout (``get_kv_cache_shape``, from which the model
runner sizes and allocates the cache), prepares its own metadata once per forward
from the :class:`CommonAttentionMetadata` (``build_metadata``), and computes attention
for one layer (``forward``). The model runner calls ``build_metadata`` once per step
and stores the result in ``ForwardContext.backend_metadata``; attention layers pass it
back to ``forward``.

Backends (``PAGEDSERVE_ATTENTION_BACKEND``): ``cpu`` reads the paged cache in place (a
C++ kernel; with AMX, SDPA over cache views for long prefill chunks; CPU only), ``torch``
gathers each group's context by block table and runs SDPA (any device: the reference and
the fallback). ``auto`` takes ``cpu`` on CPU when its kernel builds, else ``torch``.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Protocol

import torch

from pagedserve import envs, platform
from pagedserve.attention.metadata import CommonAttentionMetadata

logger = logging.getLogger(__name__)


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
    """The backend for this platform and ``PAGEDSERVE_ATTENTION_BACKEND`` (chosen once)."""
    backend = select_attn_backend(envs.PAGEDSERVE_ATTENTION_BACKEND, platform.device())
    logger.info("Attention backend: %s", backend.name)
    return backend


def select_attn_backend(choice: str, device: torch.device) -> AttentionBackend:
    """``choice``: auto, cpu or torch. ``cpu`` fails loudly where it cannot run; ``auto``
    falls back to ``torch`` (with a warning on CPU, where ``cpu`` was expected)."""
    from pagedserve.attention.torch_backend import TorchAttentionBackend

    if choice == "torch":
        return TorchAttentionBackend()
    if device.type != "cpu":
        if choice == "cpu":
            raise ValueError(f"attention backend 'cpu' runs on CPU only, not on {device}")
        return TorchAttentionBackend()
    from pagedserve.attention.cpu_backend import CPUAttentionBackend
    from pagedserve.attention.cpu_kernels import load_kernel

    load = load_kernel()
    if load.kernel is not None:
        return CPUAttentionBackend(load.kernel)
    if choice == "cpu":
        raise RuntimeError(f"attention backend 'cpu' unavailable: {load.reason}")
    logger.warning("Paged-attention CPU kernel unavailable (%s): using the torch backend", load.reason)
    return TorchAttentionBackend()
