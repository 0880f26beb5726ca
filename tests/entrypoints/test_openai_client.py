"""The official `openai` client against the real server: outputs equal the offline LLM."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from pagedserve import SamplingParams
from tests.entrypoints.utils import PROMPTS
from tests.metrics.prom_utils import parse_samples

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def offline_greedy(offline_llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = offline_llm.generate(PROMPTS, params, use_tqdm=False)
    return {p: (o.outputs[0].text, list(o.outputs[0].token_ids)) for p, o in zip(PROMPTS, outputs, strict=True)}


def test_completion_greedy_equals_offline(client, offline_greedy):
    for prompt in PROMPTS[:3]:
        response = client.completions.create(
            model="gemma-3-270m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"return_token_ids": True},
        )
        choice = response.choices[0]
        text, token_ids = offline_greedy[prompt]
        assert choice.text == text
        assert choice.token_ids == token_ids
        assert choice.finish_reason in ("length", "stop")
        assert response.usage.completion_tokens == len(token_ids)
    # A list of prompts: one choice per prompt, in order.
    response = client.completions.create(
        model="gemma-3-270m", prompt=PROMPTS[3:6], max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [offline_greedy[p][0] for p in PROMPTS[3:6]]


def test_completion_stream_concatenates_to_full_text(client, offline_greedy):
    prompt = PROMPTS[0]
    stream = client.completions.create(
        model="gemma-3-270m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == offline_greedy[prompt][0]
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert text_chunks[-1].choices[0].finish_reason in ("length", "stop")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == len(offline_greedy[prompt][1])
    assert all(c.usage is None for c in text_chunks)


def test_chat_greedy_equals_offline(client, offline_llm):
    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    offline = offline_llm.chat(
        messages, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False
    )[0]
    expected = offline.outputs[0]
    response = client.chat.completions.create(
        model="gemma-3-270m", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    message = response.choices[0].message
    assert message.role == "assistant"
    assert message.content == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == len(offline.prompt_token_ids)

    stream = client.chat.completions.create(
        model="gemma-3-270m", messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason


# Used by no other test against the session's server, so none of its blocks are cached
# before test_n_and_seed; long enough for full blocks (the server's block_size is 16).
N_PROMPT = (
    "The lighthouse keeper of Port Ellery kept a ledger of every ship that passed the "
    "point, the weather over the bay, and the oil burned in the great lamp; one winter "
    "night he wrote that"
)
BLOCK_SIZE = 16


def prefix_cache_hits(server) -> float:
    samples = parse_samples(httpx.get(server.url + "/metrics", timeout=30).text)
    return sum(v for (name, _), v in samples.items() if name == "pagedserve:prefix_cache_hits_total")


def wait_for_hits(server, at_least: float, timeout: float = 15.0) -> float:
    """Prefix-cache hits once they reach ``at_least`` (the stats of a step arrive with it)."""
    deadline = time.monotonic() + timeout
    while (hits := prefix_cache_hits(server)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    return hits


def test_n_and_seed(client, server):
    kwargs = dict(model="gemma-3-270m", prompt=N_PROMPT, max_tokens=8, temperature=1.0, seed=1234)
    hits_before = prefix_cache_hits(server)
    first = client.completions.create(n=3, **kwargs)
    # Prefix hits stop short of the last prompt token, in whole blocks.
    full_blocks_tokens = (first.usage.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert full_blocks_tokens >= 2 * BLOCK_SIZE
    # The first sibling (whose count usage reports) found nothing cached; siblings 1 and 2
    # hit the prompt's full blocks it registered when admitted.
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    hits_first = wait_for_hits(server, hits_before + 2 * full_blocks_tokens)
    assert hits_first - hits_before == 2 * full_blocks_tokens
    second = client.completions.create(n=3, **kwargs)
    assert second.usage.prompt_tokens_details.cached_tokens == full_blocks_tokens
    assert wait_for_hits(server, hits_first + 3 * full_blocks_tokens) - hits_first == (
        3 * full_blocks_tokens)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    # Each sibling samples with its own seed: the three are not all the same.
    assert len({c.text for c in first.choices}) > 1
    assert all(c.finish_reason in ("length", "stop") for c in first.choices)
    assert first.usage.completion_tokens <= 24
    chat = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Tell me a word."}],
        n=2, max_tokens=4, temperature=1.0, seed=7,
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_completion_logprobs(client):
    response = client.completions.create(
        model="gemma-3-270m", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens
    assert "".join(logprobs.tokens) == response.choices[0].text
    for token, token_logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert token_logprob <= 0
        assert 3 <= len(top) <= 4
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(token_logprob, max(top.values()), abs_tol=1e-5)
        assert top[token] == token_logprob
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs(client):
    response = client.chat.completions.create(
        model="gemma-3-270m", messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())


def test_stop_strings(client, offline_greedy):
    prompt = PROMPTS[0]
    full = offline_greedy[prompt][0]
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    response = client.completions.create(
        model="gemma-3-270m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    choice = response.choices[0]
    assert choice.text == full[: full.index(stop)]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    included = client.completions.create(
        model="gemma-3-270m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=stop,
        extra_body={"include_stop_str_in_output": True}, stream=True,
    )
    streamed = "".join(c.choices[0].text for c in included if c.choices)
    assert streamed == full[: full.index(stop) + len(stop)]


def test_usage_and_cached_tokens(client, server):
    prompt = " ".join(f"item {i} is {i * i};" for i in range(8)) + " so item 8 is"
    with server.http() as http:
        count = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    first = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model="gemma-3-270m", prompt=prompt, max_tokens=4, temperature=0)
    for response in (first, second):
        usage = response.usage
        assert usage.prompt_tokens == count
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert count > 32
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.choices[0].text == first.choices[0].text


def test_64_concurrent_streams(server, offline_greedy):
    num_tokens = 4  # greedy: the first tokens of the offline continuation

    async def one(client, prompt: str) -> tuple[str, list[int]]:
        stream = await client.completions.create(
            model="gemma-3-270m", prompt=prompt, max_tokens=num_tokens, temperature=0,
            stream=True, extra_body={"return_token_ids": True},
        )
        chunks = [c.choices[0] async for c in stream if c.choices]
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]

    async def run_all() -> list[tuple[str, list[int]]]:
        client = server.async_openai(timeout=300)
        try:
            return await asyncio.gather(*(one(client, PROMPTS[i % 8]) for i in range(64)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    for i, (text, token_ids) in enumerate(results):
        full_text, full_ids = offline_greedy[PROMPTS[i % 8]]
        assert token_ids == full_ids[:num_tokens]
        assert full_text.startswith(text) and text
