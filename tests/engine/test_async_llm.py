"""AsyncLLM over a real engine-core process (tiny model): outputs equal the offline LLM,
closing a generator aborts its request, health and prefix-cache reset work."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.input_processor import InvalidRequestError
from pagedserve.sampling_params import RequestOutputKind

PROMPT = "the quick brown fox jumps over the lazy dog " * 3
ENGINE_KWARGS = {"dtype": "float32", "block_size": 4, "kv_cache_memory": "4MiB"}


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("llama")


def test_async_llm_end_to_end(folder):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = LLM(model=folder, **ENGINE_KWARGS).generate(PROMPT, greedy, use_tqdm=False)[0]

    async def run() -> None:
        engine = AsyncLLM.from_engine_args(EngineArgs(model=folder, **ENGINE_KWARGS))
        try:
            assert engine.health().status == "ok"
            delta = greedy.clone()
            delta.output_kind = RequestOutputKind.DELTA
            tokens: list[int] = []
            async for output in engine.generate(PROMPT, delta, "r1"):
                tokens.extend(output.outputs[0].token_ids)
            assert tokens == list(expected.outputs[0].token_ids)
            assert output.finished and output.num_cached_tokens == 0

            # Same prompt again: its full blocks but the last come from the prefix cache.
            final = [o async for o in engine.generate(PROMPT, greedy, "r2")][-1]
            prompt_len = len(final.prompt_token_ids)
            assert final.num_cached_tokens == (prompt_len - 1) // 4 * 4

            # A duplicate id and a bad prompt are refused; nothing is left behind.
            stream = engine.generate(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True), "r3")
            await stream.__anext__()
            with pytest.raises(InvalidRequestError, match="already running"):
                engine.add_request("r3", PROMPT, greedy)
            with pytest.raises(ValueError, match="out of vocabulary"):
                engine.add_request("bad", [10**9], greedy)
            # Closing the generator (a client going away) aborts the request in the core.
            await stream.aclose()
            assert engine.num_unfinished_requests() == 0
            for _ in range(100):
                await asyncio.sleep(0.05)
                stats = engine.scheduler_stats
                if stats is not None and stats.num_running_reqs == 0 and stats.kv_cache_usage == 0:
                    break
            assert stats is not None and stats.num_running_reqs == 0
            assert stats.kv_cache_usage == 0.0

            assert await engine.reset_prefix_cache()
            final = [o async for o in engine.generate(PROMPT, greedy, "r4")][-1]
            assert final.num_cached_tokens == 0
        finally:
            await engine.shutdown()
        assert engine.health().status == "dead"

    asyncio.run(run())
