"""Every architecture end to end through LLM.generate: greedy tokens equal transformers'."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.utils.tiny_models import TINY_ARCHS

PROMPTS = ["hello world", "def fibonacci(n):", "the quick brown fox jumps over the lazy dog " * 3]
NUM_TOKENS = 10


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_llm_greedy_equals_transformers(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(arch)
    # block_size 4 and a 16-token budget: prompts span several blocks and prefill in chunks.
    llm = LLM(model=folder, dtype="float32", block_size=4, max_num_batched_tokens=16,
              kv_cache_memory="4MiB")
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for output in outputs:
        ids = torch.tensor([output.prompt_token_ids])
        with torch.inference_mode():
            expected = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS,
            )[0, ids.shape[1]:].tolist()
        assert output.outputs[0].token_ids == expected, (arch, output.prompt)
        assert output.outputs[0].finish_reason == "length"
    assert llm.llm_engine.get_stats().kv_cache_usage == 0.0
