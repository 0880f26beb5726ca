"""The output processor: engine-core outputs -> RequestOutputs (detokenized text, stop
strings, logprobs, n > 1 fan-in, output kinds, aborts), with a real tokenizer."""

from __future__ import annotations

import pytest

from pagedserve.engine.messages import EngineCoreOutput
from pagedserve.engine.output_processor import OutputProcessor, ParentRequest
from pagedserve.metrics.stats import IterationStats
from pagedserve.sampling_params import RequestOutputKind, SamplingParams
from tests.utils.tiny_models import make_tiny_tokenizer

PROMPT_IDS = [1, 40, 41]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _add(processor: OutputProcessor, request_id: str, params: SamplingParams) -> ParentRequest:
    parent = ParentRequest(request_id, params)
    for index in range(parent.n):
        processor.add_request(
            parent, index, "prompt", PROMPT_IDS, parent.child_params(index), arrival_time=1.0
        )
    return parent


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_delta_text_and_logprobs(tokenizer):
    processor = OutputProcessor(tokenizer, log_stats=True)
    params = SamplingParams(max_tokens=8, logprobs=1, output_kind=RequestOutputKind.DELTA)
    _add(processor, "r", params)
    ids = _ids(tokenizer, "the quick brown fox")
    assert len(ids) >= 3
    texts, stats = [], IterationStats()
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        output = EngineCoreOutput(
            "r", [token], new_logprobs=[[(token, -0.5, 1), (7, -1.5, 2)]],
            finish_reason="length" if last else None, num_cached_tokens=0,
        )
        outputs, to_abort = processor.process_outputs([output], now=2.0 + i, iteration_stats=stats)
        assert to_abort == []
        (request_output,) = outputs
        completion = request_output.outputs[0]
        assert completion.token_ids == [token]  # DELTA: only what is new
        assert completion.logprobs[0][token].logprob == -0.5
        assert completion.logprobs[0][7].rank == 2
        texts.append(completion.text)
        assert request_output.finished == last
    assert "".join(texts) == tokenizer.decode(ids)
    assert completion.cumulative_logprob == pytest.approx(-0.5 * len(ids))
    assert not processor.has_unfinished_requests() and not processor.parents
    # One IterationStats over all steps: every token, one TTFT, one finished request.
    assert stats.num_generation_tokens == len(ids)
    assert stats.num_prompt_tokens == len(PROMPT_IDS)
    assert len(stats.time_to_first_tokens_iter) == 1
    assert len(stats.inter_token_latencies_iter) == len(ids) - 1
    assert [f.finish_reason for f in stats.finished_requests] == ["length"]


def test_stop_string_ends_request_and_asks_core_to_abort(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=20, stop=["brown"], output_kind=RequestOutputKind.FINAL_ONLY)
    _add(processor, "s", params)
    ids = _ids(tokenizer, "the quick brown fox jumps")
    finals = []
    for token in ids:
        outputs, to_abort = processor.process_outputs([EngineCoreOutput("s", [token])])
        finals.extend(outputs)
        if to_abort:
            break
    assert to_abort == ["s"]
    (final,) = finals  # FINAL_ONLY: one output, at the end
    completion = final.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == "brown"
    assert completion.text == "the quick "
    # Outputs for a request that ended meanwhile are ignored.
    assert processor.process_outputs([EngineCoreOutput("s", [ids[-1]])]) == ([], [])


def test_n_children_fan_in_and_abort(tokenizer):
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(n=2, seed=5, max_tokens=2, output_kind=RequestOutputKind.CUMULATIVE)
    parent = _add(processor, "p", params)
    assert [c.request_id for c in parent.children.values()] == ["0_p", "1_p"]
    assert [c.params.seed for c in parent.children.values()] == [5, 6]
    (out,), _ = processor.process_outputs(
        [EngineCoreOutput("0_p", [40]), EngineCoreOutput("1_p", [41])]
    )
    assert [c.token_ids for c in out.outputs] == [[40], [41]] and not out.finished
    (out,), _ = processor.process_outputs(
        [EngineCoreOutput("0_p", [42], finish_reason="length")]
    )
    assert [c.token_ids for c in out.outputs] == [[40, 42], [41]] and not out.finished
    # Aborting the parent returns the child still running in the core.
    assert processor.abort_requests(["p"]) == ["1_p"]
    assert not processor.has_unfinished_requests()
    assert processor.abort_requests(["p"]) == []
