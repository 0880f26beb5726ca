"""Synthetic prompts for offline benchmarks."""

from __future__ import annotations

import numpy as np


def random_token_prompts(
    num_prompts: int, input_len: int, vocab_size: int, seed: int, low: int = 1000
) -> list[list[int]]:
    """Random token-id prompts of exactly ``input_len`` tokens, reproducible by seed."""
    rng = np.random.default_rng(seed)
    high = max(low + 1, vocab_size - 1000)
    return [rng.integers(low, high, size=input_len).tolist() for _ in range(num_prompts)]
