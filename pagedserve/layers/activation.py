"""Gated activations over a fused ``[gate | up]`` projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` (Llama, Qwen, Mistral)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)  # in place on the fresh activation: one allocation


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` for ``x = [gate | up]`` (Gemma's ``gelu_pytorch_tanh``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh").mul_(up)


_GATED = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
}


def get_gated_activation(name: str) -> nn.Module:
    """The gated activation for an HF ``hidden_act`` name."""
    if name not in _GATED:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_GATED)}")
    return _GATED[name]()
