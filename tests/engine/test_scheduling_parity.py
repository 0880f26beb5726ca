"""Scheduling never changes answers: alone vs batched, prefix cache on/off, chunked prefill,
preemption, priority order. Real Gemma 3 270M in float32, greedy."""

from __future__ import annotations

import gc

import pytest

from pagedserve import LLM, SamplingParams
from tests.engine.conftest import PROMPTS

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SHARED_PREFIX = (
    "You are a helpful assistant. Answer briefly and precisely, using plain words. "
    "Question: "
)


@pytest.fixture(scope="module")
def reference(gemma_llm) -> dict[str, list[int]]:
    """Each prompt run alone."""
    prompts = PROMPTS + [SHARED_PREFIX + p for p in PROMPTS[:3]]
    return {
        p: gemma_llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts
    }


def _tokens(llm: LLM, prompts: list[str]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _make(**kwargs) -> LLM:
    gc.collect()
    return LLM(dtype="float32", quantization="none", max_model_len=1024, **kwargs)


def test_batched_equals_alone(gemma_llm, reference):
    prompts = list(reference)
    assert _tokens(gemma_llm, prompts) == [reference[p] for p in prompts]


def test_prefix_cache_hits_and_same_tokens(gemma_llm, reference):
    prompts = [SHARED_PREFIX + p for p in PROMPTS[:3]]
    first = gemma_llm.generate(prompts[0], GREEDY, use_tqdm=False)[0]
    rest = gemma_llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    for output in rest:
        # Every full 16-token block of the prompt prefix shared with the first request
        # comes from the cache.
        common = 0
        for a, b in zip(first.prompt_token_ids, output.prompt_token_ids, strict=False):
            if a != b:
                break
            common += 1
        assert output.num_cached_tokens == common // 16 * 16 > 0
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == [
        reference[p] for p in prompts
    ]


def test_prefix_caching_off(reference):
    llm = _make(enable_prefix_caching=False, kv_cache_memory="128MiB")
    prompts = list(reference)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [reference[p] for p in prompts]
    assert all(o.num_cached_tokens == 0 for o in outputs)


def test_tiny_token_budget_forces_chunking(reference):
    llm = _make(max_num_batched_tokens=8, kv_cache_memory="128MiB")
    prompts = list(reference)
    assert _tokens(llm, prompts) == [reference[p] for p in prompts]


def test_preemption_keeps_answers(gemma_llm, reference):
    # The engine core sized gemma_llm's cache (same model, dtype and block size).
    per_block = gemma_llm.llm_engine.kv_cache_config.bytes_per_block
    # 9 blocks (1 null + 8 usable): far fewer than 11 prompts x 2-3 blocks each.
    llm = _make(kv_cache_memory=per_block * 9)
    assert llm.llm_engine.kv_cache_config.num_blocks == 9
    prompts = list(reference)
    assert _tokens(llm, prompts) == [reference[p] for p in prompts]
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.kv_cache_usage == 0.0


def test_tiny_kv_cache_budget_is_refused(gemma_llm):
    """Sized after loading: a budget under 2 blocks is a ValueError saying what to do."""
    per_block = gemma_llm.llm_engine.kv_cache_config.bytes_per_block
    with pytest.raises(ValueError, match="raise kv_cache_memory"):
        _make(kv_cache_memory=per_block + 1)


def test_priority_order_respected(reference):
    llm = _make(scheduling_policy="priority", max_num_seqs=1, kv_cache_memory="64MiB")
    prompts = PROMPTS[:5]
    priorities = [3, 1, 4, 0, 2]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, priority=priorities)
    assert [o.outputs[0].token_ids for o in outputs] == [reference[p] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: outputs[i].metrics.first_token_time)
    assert order == sorted(range(len(prompts)), key=lambda i: priorities[i])
