"""Quality measures of a model through the engine: perplexity on ordinary English text
(tests/data/english_prose.txt, original prose written for the project) and greedy
agreement with a reference run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROSE_PATH = Path(__file__).resolve().parents[1] / "data" / "english_prose.txt"


def english_prose() -> str:
    """The prose text without its '#' header lines."""
    lines = PROSE_PATH.read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")).strip()


def prose_token_ids(tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """The prose tokenized (with BOS), cut to ``max_tokens``."""
    ids = tokenizer(english_prose()).input_ids
    return ids if max_tokens is None else ids[:max_tokens]


def token_logprobs(llm: Any, token_ids: list[int]) -> list[float]:
    """log p(token_i | tokens_<i) for i >= 1, from the engine's prompt logprobs."""
    from pagedserve import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    output = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
    assert output.prompt_logprobs is not None
    return [
        position[token].logprob
        for token, position in zip(token_ids[1:], output.prompt_logprobs[1:], strict=True)
    ]


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


@dataclass(frozen=True)
class Agreement:
    """Greedy tokens of a run against the reference's, prompt by prompt."""

    identical_share: float  # share of all compared positions where the tokens are equal
    num_identical_prompts: int  # prompts whose whole continuation is identical
    first_divergence: list[int | None]  # per prompt: first differing position, None if none

    def __str__(self) -> str:
        firsts = ",".join("-" if d is None else str(d) for d in self.first_divergence)
        return (
            f"{self.identical_share:.1%} of tokens identical, {self.num_identical_prompts}/"
            f"{len(self.first_divergence)} prompts identical, first divergence [{firsts}]"
        )


def greedy_agreement(reference: list[list[int]], tokens: list[list[int]]) -> Agreement:
    """Position-wise agreement (a position counts as identical only before the first
    divergence: after it the two runs continue different texts)."""
    firsts: list[int | None] = []
    same = total = 0
    for ref, got in zip(reference, tokens, strict=True):
        length = max(len(ref), len(got))
        first = next((i for i in range(length) if i >= len(ref) or i >= len(got) or ref[i] != got[i]), None)
        firsts.append(first)
        same += length if first is None else first
        total += length
    return Agreement(
        identical_share=same / total if total else 1.0,
        num_identical_prompts=sum(d is None for d in firsts),
        first_divergence=firsts,
    )
