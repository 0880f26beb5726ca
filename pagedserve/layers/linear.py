"""Linear layers whose parameters know how to load checkpoint shards.

Fused projections (q/k/v -> qkv, gate/up -> gate_up) hold one weight; the checkpoint
still stores the parts separately, so each parameter carries a ``weight_loader(param,
tensor, shard_id)`` that copies a part into its slice. Parameters are created with
``torch.empty`` (no random init: every weight comes from a checkpoint) on the current
default device and dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(
    param: torch.Tensor, loaded: torch.Tensor, shard_id: int | str | None = None
) -> None:
    """Copy a whole checkpoint tensor into ``param`` (casting dtype and device)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not sharded (got {shard_id!r})")
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"checkpoint tensor has shape {tuple(loaded.shape)}, parameter expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded)


def _new_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T + b`` with a plain (unsharded) weight.

    ``quant_method`` (set after loading by ``--quantization``; see
    ``layers/quantization/int8.py``) runs the layer on quantized weights instead.
    """

    quant_method: Any = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = _new_param(output_size, input_size)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = _new_param(output_size)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim (e.g. gate_up).

    ``shard_id`` is the index of the part in ``output_sizes``.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.shard_offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.weight.weight_loader = self.weight_loader
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def _shard_index(self, shard_id: int | str | None) -> int:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"shard_id must be an index below {len(self.output_sizes)}, got {shard_id!r}"
            )
        return shard_id

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if shard_id is None:
            default_weight_loader(param, loaded)
            return
        index = self._shard_index(shard_id)
        offset, size = self.shard_offsets[index], self.output_sizes[index]
        target = param.narrow(0, offset, size)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(
                f"shard {shard_id!r}: checkpoint tensor has shape {tuple(loaded.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(loaded)


class QKVLinear(MergedLinear):
    """Fused q/k/v projection: output is ``[q (H*D) | k (Hkv*D) | v (Hkv*D)]``.

    ``shard_id`` is ``"q"``, ``"k"``, ``"v"`` or the index 0, 1, 2.
    """

    _NAMES = {"q": 0, "k": 1, "v": 2}

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def _shard_index(self, shard_id: int | str | None) -> int:
        if isinstance(shard_id, str) and shard_id in self._NAMES:
            return self._NAMES[shard_id]
        return super()._shard_index(shard_id)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a fused output ``[T, q+2kv]`` into q, k, v views."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
