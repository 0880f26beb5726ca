"""Rotary position embeddings (RoPE), with transformers' frequency computations.

The inverse frequencies come from transformers' own ``ROPE_INIT_FUNCTIONS`` for the
scaled variants (linear, llama3, yarn, ...) so they match bit for bit; cos/sin are
computed per forward from the positions (once per model, not per layer).

The models rotate with :func:`apply_rotary_emb` on tables from :meth:`RotaryEmbedding.tables`:
``x * cos + roll(x, D/2) * sin_signed`` with ``sin_signed = [-sin | sin]`` is bit for bit
transformers' ``x * cos + rotate_half(x) * sin`` (negation is exact) in 4 ops instead of
7, and q and k heads can be rotated together in one call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

# Variants whose frequencies depend on the current sequence length: not supported.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def rope_parameters_for(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope parameter dict of ``config`` (transformers 5 ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x style configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        return params
    if layer_type is not None and layer_type in params:
        return params[layer_type]
    return params


def compute_inv_freq(
    config: Any, head_dim: int, layer_type: str | None = None
) -> tuple[torch.Tensor, float]:
    """Float32 inverse frequencies ``[head_dim // 2]`` and the cos/sin scaling factor."""
    params = rope_parameters_for(config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} is not supported (sequence-length dependent); "
            "supported: default, linear, llama3, yarn"
        )
    if rope_type == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        )
        attention_scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"unknown rope_type {rope_type!r}; supported: default, linear, llama3, yarn"
            )
        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # the model may be built under bf16 defaults
        try:
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](
                config, torch.device("cpu"), **kwargs
            )
        finally:
            torch.set_default_dtype(previous_dtype)
        inv_freq = inv_freq.to(device="cpu", dtype=torch.float32)
    if inv_freq.numel() * 2 != head_dim:
        raise ValueError(
            f"partial rotary embeddings are not supported (rotary dim {inv_freq.numel() * 2}, "
            f"head_dim {head_dim})"
        )
    return inv_freq, float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions, as transformers computes them."""

    def __init__(self, config: Any, head_dim: int, layer_type: str | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, self.attention_scaling = compute_inv_freq(config, head_dim, layer_type)
        # Kept out of the state dict and out of model.to(dtype): always float32.
        self._inv_freq = inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[T, head_dim]`` in ``dtype`` for ``positions [T]``."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos()
        sin = emb.sin()
        if self.attention_scaling != 1.0:
            cos = cos * self.attention_scaling
            sin = sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """The tables :func:`apply_rotary_emb` takes: ``cos`` and ``[-sin | sin]``, each
        ``[T, 1, head_dim]`` (broadcasting over heads)."""
        cos, sin = self.forward(positions, dtype)
        half = self.head_dim // 2
        sin_signed = sin.clone()
        sin_signed[:, :half].neg_()
        return RopeTables(cos[:, None, :], sin_signed[:, None, :], half)


class RopeTables(NamedTuple):
    """One forward's rotary tables for :func:`apply_rotary_emb` (shared by all layers)."""

    cos: torch.Tensor  # [T, 1, D]
    sin_signed: torch.Tensor  # [T, 1, D]: -sin on the first half, sin on the second
    half: int  # D // 2


def apply_rotary_emb(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate ``x [T, heads, D]`` (neox / rotate-half layout); any heads, q and k together."""
    rotated = torch.roll(x, tables.half, dims=-1).mul_(tables.sin_signed)
    return torch.mul(x, tables.cos).add_(rotated)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``query [T, H, D]`` and ``key [T, Hkv, D]`` (neox / rotate-half layout); the
    reference form of :func:`apply_rotary_emb`."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
