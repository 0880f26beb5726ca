"""The input processor: the one place prompts and parameters are validated (model-free:
a tiny model's configs and tokenizer; nothing is loaded into an engine)."""

from __future__ import annotations

import dataclasses

import pytest

from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.engine.input_processor import (
    InputProcessor,
    InvalidRequestError,
    ProcessedPrompt,
    QueueFullError,
    check_chat_options,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.transformers_utils.tokenizer import load_tokenizer

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def engine_config(tiny_model_dir):
    args = EngineArgs(model=tiny_model_dir("llama"), max_model_len=MAX_MODEL_LEN)
    return args.create_engine_config()


def _processor(engine_config, strict: bool = False, **scheduler_overrides) -> InputProcessor:
    scheduler_config = dataclasses.replace(engine_config.scheduler_config, **scheduler_overrides)
    tokenizer = load_tokenizer(engine_config.model_config.tokenizer_path)
    return InputProcessor(engine_config.model_config, scheduler_config, tokenizer, strict)


def _error(fn, *args, **kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


def test_prompt_forms(engine_config):
    processor = _processor(engine_config)
    text = processor.process_prompt("hello world")
    assert text.prompt == "hello world"
    assert text.prompt_token_ids == processor.tokenize("hello world")
    assert text.prompt_token_ids[0] == 1  # the tiny tokenizer adds <s>
    no_special = processor.process_prompt("hello world", add_special_tokens=False)
    assert no_special.prompt_token_ids == text.prompt_token_ids[1:]
    assert processor.process_prompt([5, 6]) == ProcessedPrompt(None, [5, 6])
    assert processor.process_prompt({"prompt_token_ids": [7], "prompt": "x"}).prompt == "x"
    assert processor.process_prompt({"prompt": "hello"}).prompt_token_ids == processor.tokenize(
        "hello"
    )
    assert _error(processor.process_prompt, {"text": "x"}).param == "prompt"
    assert _error(processor.process_prompt, 3.5).param == "prompt"
    assert _error(processor.process_prompt, [1, True]).param == "prompt"
    vocab = engine_config.model_config.vocab_size
    error = _error(processor.process_prompt, [1, vocab])
    assert error.param == "prompt" and f"valid ids are 0..{vocab - 1}" in str(error)


def test_length_and_truncation(engine_config):
    processor = _processor(engine_config)
    ids = list(range(10, 20))
    fitted = processor.fit_prompt(
        ProcessedPrompt("text", ids), SamplingParams(truncate_prompt_tokens=3)
    )
    assert fitted == ProcessedPrompt(None, [17, 18, 19])
    # Truncation longer than the prompt keeps it (and its text).
    assert processor.fit_prompt(
        ProcessedPrompt("text", ids), SamplingParams(truncate_prompt_tokens=30)
    ) == ProcessedPrompt("text", ids)
    assert _error(processor.fit_prompt, ProcessedPrompt(None, []), SamplingParams()).param == (
        "prompt"
    )
    error = _error(processor.fit_prompt, ProcessedPrompt(None, [5] * MAX_MODEL_LEN),
                   SamplingParams())
    assert error.param == "input_tokens"
    assert str(error).startswith(
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your request "
        f"has {MAX_MODEL_LEN} input tokens."
    )
    # One token shorter fits, leaving room for one generated token.
    processor.fit_prompt(ProcessedPrompt(None, [5] * (MAX_MODEL_LEN - 1)), SamplingParams())


def test_max_tokens_resolution(engine_config):
    lenient, strict = _processor(engine_config), _processor(engine_config, strict=True)
    assert lenient.check_params(SamplingParams(max_tokens=None), 10).max_tokens == MAX_MODEL_LEN - 10
    assert strict.check_params(SamplingParams(max_tokens=None), 10).max_tokens == MAX_MODEL_LEN - 10
    # Offline (lenient), generation just stops at max_model_len; the API refuses.
    assert lenient.check_params(SamplingParams(max_tokens=60), 10).max_tokens == 60
    error = _error(strict.check_params, SamplingParams(max_tokens=60), 10)
    assert error.param == "max_tokens" and "60 > 64 - 10" in str(error)
    assert strict.check_params(SamplingParams(max_tokens=54), 10).max_tokens == 54


def test_parameter_checks_name_the_parameter(engine_config):
    processor = _processor(engine_config)
    vocab = engine_config.model_config.vocab_size
    cases = [
        (SamplingParams(logprobs=21), "logprobs"),
        (SamplingParams(prompt_logprobs=25), "prompt_logprobs"),
        (SamplingParams(stop_token_ids=[vocab + 3]), "stop_token_ids"),
        (SamplingParams(allowed_token_ids=[]), "allowed_token_ids"),
        (SamplingParams(allowed_token_ids=[1, -1]), "allowed_token_ids"),
        (SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
    ]
    for params, param in cases:
        assert _error(processor.check_params, params, 4).param == param
    original = SamplingParams(max_tokens=None, logprobs=20)
    checked = processor.check_params(original, 4)
    assert checked is not original and original.max_tokens is None


def test_priority_salt_and_requests(engine_config):
    fcfs = _processor(engine_config)
    priority = _processor(engine_config, policy="priority")
    params = [SamplingParams(max_tokens=4, seed=1), SamplingParams(max_tokens=4, seed=2)]
    assert _error(fcfs.process_inputs, ["a"], "hi", params[:1], priority=3).param == "priority"
    assert _error(priority.process_inputs, ["a"], "hi", params[:1], priority="3").param == (
        "priority"
    )
    assert _error(fcfs.process_inputs, ["a"], "hi", params[:1], cache_salt="").param == (
        "cache_salt"
    )
    processed, requests = priority.process_inputs(
        ["0_r", "1_r"], "hello there", params, priority=-2, arrival_time=12.5, cache_salt="t1"
    )
    assert processed.prompt == "hello there"
    assert [r.request_id for r in requests] == ["0_r", "1_r"]
    assert [r.sampling_params.seed for r in requests] == [1, 2]
    for request in requests:
        assert request.prompt_token_ids == processed.prompt_token_ids
        assert (request.priority, request.arrival_time, request.cache_salt) == (-2, 12.5, "t1")
    # Requests carry copies: the engine may fill fields without touching the caller's params.
    assert requests[0].sampling_params is not params[0]


def test_queue_capacity_and_chat_options(engine_config):
    unbounded = _processor(engine_config)
    unbounded.check_capacity(10**6, 10**6)
    bounded = _processor(engine_config, max_num_queued_requests=4)
    bounded.check_capacity(3, 1)
    with pytest.raises(QueueFullError, match="--max-num-queued-requests 4"):
        bounded.check_capacity(3, 2)
    check_chat_options(add_generation_prompt=True, continue_final_message=False)
    error = _error(check_chat_options, add_generation_prompt=True, continue_final_message=True)
    assert error.param == "continue_final_message"
