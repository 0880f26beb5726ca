"""Applying a token bitmask (llguidance's layout: bit ``t % 32`` of int32 word ``t // 32``
set = token ``t`` allowed) to rows of the logits, in place."""

from __future__ import annotations

import torch

_BIT_CACHE: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    bits = _BIT_CACHE.get(device)
    if bits is None:
        bits = _BIT_CACHE[device] = torch.arange(32, dtype=torch.int32, device=device)
    return bits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set ``logits[rows[i], t]`` to -inf for every token ``t`` not allowed by
    ``bitmask[i]`` (int32 ``[len(rows), ceil(V / 32)]``); other rows are untouched."""
    vocab_size = logits.shape[1]
    bitmask = bitmask.to(logits.device)
    allowed = (bitmask.unsqueeze(-1) >> _bits(logits.device)) & 1  # [n, words, 32]
    allowed = allowed.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
    selected = logits.index_select(0, rows)
    selected.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, selected)
