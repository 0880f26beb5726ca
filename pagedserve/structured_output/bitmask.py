"""Applying a token bitmask (llguidance's layout: bit ``t % 32`` of int32 word ``t // 32``
set = token ``t`` allowed) to rows of the logits, in place.

On CPU the bits are unpacked by numpy (``unpackbits``: one byte per token, 256 KiB per
row of a 262k vocabulary) and each constrained row is masked in place: no full-size int32
expansion (which cost ~20% of a 16-request decode step) and no copy of unconstrained rows.
"""

from __future__ import annotations

import numpy as np
import torch

_BIT_CACHE: dict[torch.device, torch.Tensor] = {}


def _bits(device: torch.device) -> torch.Tensor:
    bits = _BIT_CACHE.get(device)
    if bits is None:
        bits = _BIT_CACHE[device] = torch.arange(32, dtype=torch.int32, device=device)
    return bits


def disallowed_tokens(bitmask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool ``[n, vocab_size]``: True where the bitmask forbids the token."""
    if device.type == "cpu":
        words = np.ascontiguousarray(bitmask.cpu().numpy()).view(np.uint8)
        allowed = np.unpackbits(words, axis=1, bitorder="little", count=vocab_size)
        return torch.from_numpy(allowed).logical_not()
    bitmask = bitmask.to(device)
    allowed = (bitmask.unsqueeze(-1) >> _bits(device)) & 1  # [n, words, 32]
    return allowed.view(bitmask.shape[0], -1)[:, :vocab_size] == 0


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``logits[rows[i], t]`` to -inf for every token ``t`` not allowed by
    ``bitmask[i]`` (int32 ``[len(rows), ceil(V / 32)]``); other rows are untouched."""
    disallowed = disallowed_tokens(bitmask, logits.shape[1], logits.device)
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(disallowed, float("-inf"))
        return
    for i, row in enumerate(rows):
        logits[row].masked_fill_(disallowed[i], float("-inf"))
