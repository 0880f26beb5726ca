"""RequestOutputCollector: a slow consumer gets merged deltas, never a backlog (model-free)."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.engine.async_llm import RequestOutputCollector
from pagedserve.engine.core_client import EngineDeadError
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import RequestOutputKind


def _output(index: int, text: str, ids: list[int], finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(
        index=index, text=text, token_ids=ids, cumulative_logprob=None,
        logprobs=[{i: Logprob(-1.0)} for i in ids], finish_reason="length" if finished else None,
    )
    return RequestOutput("r", "p", [1], None, [completion], finished=finished)


def test_delta_outputs_merge_until_taken():
    async def run() -> None:
        collector = RequestOutputCollector(RequestOutputKind.DELTA)
        collector.put(_output(0, "Hel", [1]))
        collector.put(_output(1, "A", [7]))
        collector.put(_output(0, "lo", [2], finished=True))
        merged = await collector.get()
        assert merged.finished
        by_index = {c.index: c for c in merged.outputs}
        assert by_index[0].text == "Hello" and by_index[0].token_ids == [1, 2]
        assert len(by_index[0].logprobs) == 2 and by_index[0].finish_reason == "length"
        assert by_index[1].text == "A"
        assert collector.get_nowait() is None

        collector.put(EngineDeadError("gone"))
        with pytest.raises(EngineDeadError):
            await collector.get()

    asyncio.run(run())


def test_cumulative_outputs_replace():
    collector = RequestOutputCollector(RequestOutputKind.FINAL_ONLY)
    collector.put(_output(0, "a", [1]))
    collector.put(_output(0, "ab", [1, 2], finished=True))
    taken = collector.get_nowait()
    assert taken is not None and taken.outputs[0].text == "ab"
