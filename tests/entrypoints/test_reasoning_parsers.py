"""Reasoning parsers on exact Qwen3 / DeepSeek-R1 output strings, streamed in any chunks."""

from __future__ import annotations

import random

import pytest

from pagedserve.entrypoints.openai.reasoning import REASONING_PARSERS, StreamingReasoning

CASES = [
    ("qwen3", "<think>\nThe user greets me. I should reply.\n</think>\n\nHello! How can I help?",
     "\nThe user greets me. I should reply.\n", "\n\nHello! How can I help?"),
    ("qwen3", "Hello without thinking.", None, "Hello without thinking."),
    ("qwen3", "<think>\nStill thinking when max_tokens hit", "\nStill thinking when max_tokens hit", None),
    ("qwen3", "<think></think>Answer only.", None, "Answer only."),
    ("qwen3", "a < b and <thin", None, "a < b and <thin"),
    ("deepseek_r1", "Let me think: 2 + 2 = 4.\n</think>\n\nThe answer is 4.",
     "Let me think: 2 + 2 = 4.\n", "\n\nThe answer is 4."),
    ("deepseek_r1", "<think>\nreasoning\n</think>answer", "\nreasoning\n", "answer"),
    ("deepseek_r1", "all reasoning, no end", "all reasoning, no end", None),
]


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_whole_outputs(name: str, text: str, reasoning, content) -> None:  # noqa: ANN001
    assert REASONING_PARSERS[name].extract(text) == (reasoning, content)


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
@pytest.mark.parametrize("seed", range(20))
def test_streaming_in_any_chunks_equals_the_whole(name: str, text: str, reasoning, content, seed: int) -> None:  # noqa: ANN001
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 15))))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    holder = StreamingReasoning(REASONING_PARSERS[name])
    parts = [holder.feed(chunk) for chunk in chunks] + [holder.finish()]
    streamed_reasoning = "".join(r for r, _ in parts)
    streamed_content = "".join(c for _, c in parts)
    assert (streamed_reasoning or None, streamed_content or None) == (reasoning, content)
    assert all("<think>" not in r + c and "</think>" not in r + c for r, c in parts)
