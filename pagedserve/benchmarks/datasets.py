"""Synthetic prompts for offline benchmarks."""

from __future__ import annotations

import numpy as np


def random_token_prompts(
    num_prompts: int, input_len: int, vocab_size: int, seed: int
) -> list[list[int]]:
    """Random token-id prompts of exactly ``input_len`` tokens, reproducible by seed.

    Ids near both ends of the vocabulary (special and control tokens in most
    tokenizers) are left out.
    """
    margin = min(1000, vocab_size // 4)
    rng = np.random.default_rng(seed)
    return [
        rng.integers(margin, vocab_size - margin, size=input_len).tolist()
        for _ in range(num_prompts)
    ]
