"""Sampling features end to end on the real Gemma 3 270M (float32)."""

from __future__ import annotations

import math

import pytest

from pagedserve import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The history of the printing press began"


def test_seed_reproducible_whatever_the_batch(gemma_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = gemma_llm.generate(PROMPT, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.2, max_tokens=12, ignore_eos=True)
    batch = gemma_llm.generate(
        ["Some other prompt", PROMPT, "Yet another one here"],
        [others, seeded, others],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone
    again = gemma_llm.generate(PROMPT, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


# Seen by no other test, so this engine has none of its blocks cached before
# test_n_completions; long enough for full blocks (block_size 16).
N_PROMPT = (
    "The lighthouse keeper of Port Ellery kept a ledger of every ship that passed the "
    "point, the weather over the bay, and the oil burned in the great lamp; one winter "
    "night he wrote that"
)


def test_n_completions(gemma_llm):
    engine = gemma_llm.llm_engine
    block_size = engine.engine_config.cache_config.block_size
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    hits_before = engine.get_stats().prefix_cache_hits
    output = gemma_llm.generate(N_PROMPT, params, use_tqdm=False)[0]
    hits_first = engine.get_stats().prefix_cache_hits
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in output.outputs)
    assert output.finished
    # Each sibling samples with its own seed: the three are not all the same.
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    # Prefix hits stop short of the last prompt token, in whole blocks.
    prompt_len = len(output.prompt_token_ids)
    full_blocks_tokens = (prompt_len - 1) // block_size * block_size
    assert full_blocks_tokens >= 2 * block_size
    # Sibling 0 (whose count the output reports) found nothing cached; it registered the
    # prompt's full blocks when admitted, and siblings 1 and 2 hit all of them.
    assert output.num_cached_tokens == 0
    assert hits_first - hits_before == 2 * full_blocks_tokens
    # Seeded n > 1 is reproducible too; now every sibling hits the cached prompt.
    again = gemma_llm.generate(N_PROMPT, params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]
    assert again.num_cached_tokens == full_blocks_tokens
    assert engine.get_stats().prefix_cache_hits - hits_first == 3 * full_blocks_tokens


def test_logprobs_and_prompt_logprobs(gemma_llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2,
                            ignore_eos=True)
    output = gemma_llm.generate(PROMPT, params, use_tqdm=False)[0]
    completion = output.outputs[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 6
    total = 0.0
    for token_id, position in zip(completion.token_ids, completion.logprobs, strict=True):
        assert token_id in position
        assert position[token_id].rank == 1  # greedy picks the most likely token
        assert 3 <= len(position) <= 4
        assert all(lp.logprob <= 0.0 for lp in position.values())
        total += position[token_id].logprob
    assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-5, abs_tol=1e-5)
    prompt_lps = output.prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(output.prompt_token_ids)
    assert prompt_lps[0] is None
    for next_id, position in zip(output.prompt_token_ids[1:], prompt_lps[1:], strict=True):
        assert next_id in position and 2 <= len(position) <= 3


def test_stop_strings_and_tokens(gemma_llm):
    tokenizer = gemma_llm.get_tokenizer()
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = gemma_llm.generate(PROMPT, base, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length"
    words = full.text.split()
    assert len(words) >= 4
    stop = words[3]
    cut = full.text.index(stop)

    stopped = gemma_llm.generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop

    kept = gemma_llm.generate(
        PROMPT,
        SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                       include_stop_str_in_output=True, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full.text[: cut + len(stop)]

    stop_id = full.token_ids[2]
    by_id = gemma_llm.generate(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    first = full.token_ids.index(stop_id)
    assert by_id.token_ids == full.token_ids[: first + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    assert by_id.text == tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)

    held = gemma_llm.generate(
        PROMPT,
        SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[full.token_ids[0]],
                       min_tokens=3),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(held.token_ids) >= 3
    assert full.token_ids[0] not in held.token_ids[:2]


def test_chat_uses_family_template(gemma_llm):
    messages = [{"role": "user", "content": "Say hello in French."}]
    output = gemma_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert "<start_of_turn>user" in output.prompt
    assert output.prompt.rstrip().endswith("<start_of_turn>model")
    tokenizer = gemma_llm.get_tokenizer()
    assert output.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert output.outputs[0].token_ids
