"""The real Gemma 3 270M (bundled GGUF), float32: greedy tokens equal transformers' generate."""

from __future__ import annotations

import pytest
import torch

from pagedserve import SamplingParams
from tests.engine.conftest import PROMPTS, long_prompt

pytestmark = pytest.mark.slow

NUM_TOKENS = 32


@torch.inference_mode()
def _hf_greedy(hf_model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    out = hf_model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=num_tokens,
        do_sample=False,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_matches_transformers(gemma_llm, hf_gemma):
    prompts = PROMPTS + [long_prompt()]
    tokenizer = gemma_llm.get_tokenizer()
    assert len(tokenizer(prompts[-1]).input_ids) > 512  # crosses the sliding window
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS)
    outputs = gemma_llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = _hf_greedy(hf_gemma, output.prompt_token_ids, NUM_TOKENS)
        got = output.outputs[0].token_ids
        assert got == expected[: len(got)], f"prompt {prompt[:40]!r}: {got} != {expected}"
        # We stop exactly where transformers stops: at EOS or after NUM_TOKENS tokens.
        assert len(got) == len(expected)
        assert output.outputs[0].text == tokenizer.decode(got, skip_special_tokens=True)
