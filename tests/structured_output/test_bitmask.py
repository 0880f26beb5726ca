"""The token bitmask applied to logits rows (CPU unpacking and the generic torch path)."""

from __future__ import annotations

import torch

from pagedserve.structured_output import bitmask as bm


def _random_bitmask(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    allowed = torch.rand(rows, vocab, generator=torch.Generator().manual_seed(seed)) < 0.3
    padded = torch.zeros(rows, (vocab + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # llguidance's int32 words
    return words, allowed


def test_only_the_constrained_rows_are_masked_exactly() -> None:
    vocab = 1000
    words, allowed = _random_bitmask(2, vocab, 0)
    logits = torch.randn(4, vocab)
    before = logits.clone()
    bm.apply_token_bitmask(logits, words, [3, 1])
    for row, i in ((3, 0), (1, 1)):
        assert torch.equal(torch.isfinite(logits[row]), allowed[i])
        assert torch.equal(logits[row][allowed[i]], before[row][allowed[i]])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])


def test_cpu_and_generic_paths_agree_and_all_rows_at_once() -> None:
    words, allowed = _random_bitmask(3, 777, 1)
    cpu = bm.disallowed_tokens(words, 777, torch.device("cpu"))
    bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    generic = bits.view(3, -1)[:, :777] == 0
    assert torch.equal(cpu, ~allowed) and torch.equal(generic, ~allowed)
    logits = torch.zeros(3, 777)
    bm.apply_token_bitmask(logits, words, [0, 1, 2])
    assert torch.equal(torch.isfinite(logits), allowed)
