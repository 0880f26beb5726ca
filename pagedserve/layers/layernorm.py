"""RMSNorm variants, numerically as transformers computes them."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalize in float32, cast back, then scale by ``weight``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma RMSNorm: ``x_norm * (1 + weight)`` all in float32, then cast back.

    The checkpoint stores ``weight`` centred on 0 (transformers' convention).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).type_as(x)
