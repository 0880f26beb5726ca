"""EngineArgs is the one source of engine knobs: the flags and LLM's keywords are made
from its fields; defaults resolve in one place; the engine config has no front-end
settings (served names, chat templates)."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields

import pytest

from pagedserve import platform
from pagedserve.config import ModelConfig
from pagedserve.engine.arg_utils import EngineArgs
from pagedserve.entrypoints.engine_flags import add_engine_flags, engine_args_from_flags


def _parser(with_model: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_engine_flags(parser, with_model=with_model)
    return parser


def test_every_engine_arg_is_a_flag_with_the_fields_default() -> None:
    args = _parser().parse_args([])
    for spec in EngineArgs.specs():
        assert getattr(args, spec.name) == spec.default, spec.name
        assert spec.help, f"{spec.name} has no help text"
    assert engine_args_from_flags(args) == EngineArgs()
    assert not hasattr(_parser(with_model=False).parse_args([]), "model")


def test_flags_parse_to_the_field_types() -> None:
    args = _parser().parse_args([
        "--model", "m", "--revision", "v1", "--long-prefill-token-threshold", "64",
        "--max-num-batched-tokens", "512", "--kv-cache-memory", "4GiB",
        "--no-enable-prefix-caching", "--max-num-queued-requests", "2", "--seed", "7",
        "--scheduling-policy", "priority",
    ])
    assert engine_args_from_flags(args) == EngineArgs(
        model="m", revision="v1", long_prefill_token_threshold=64, max_num_batched_tokens=512,
        kv_cache_memory="4GiB", enable_prefix_caching=False, max_num_queued_requests=2, seed=7,
        scheduling_policy="priority",
    )
    with pytest.raises(SystemExit):
        _parser().parse_args(["--dtype", "int3"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--max-num-seqs", "many"])


def test_engine_args_from_flags_ignores_other_flags_and_keeps_missing_defaults() -> None:
    namespace = argparse.Namespace(model="m", max_num_seqs=3, port=9, chat_template="x")
    assert engine_args_from_flags(namespace) == EngineArgs(model="m", max_num_seqs=3)


def test_front_end_settings_are_not_engine_args() -> None:
    names = {f.name for f in fields(EngineArgs)}
    assert not names & {"served_model_name", "chat_template", "api_key"}
    model_fields = {f.name for f in fields(ModelConfig)}
    assert not model_fields & {"served_model_name", "chat_template"}


def test_llm_signature_is_generated_from_engine_args() -> None:
    from pagedserve import LLM

    parameters = inspect.signature(LLM).parameters
    assert list(parameters) == [spec.name for spec in EngineArgs.specs()]
    for spec in EngineArgs.specs():
        assert parameters[spec.name].default == spec.default, spec.name


def test_llm_rejects_an_unknown_keyword_by_name() -> None:
    from pagedserve import LLM

    with pytest.raises(TypeError, match=r"'max_num_seq' \(did you mean 'max_num_seqs'\?\)"):
        LLM(max_num_seq=4)
    with pytest.raises(TypeError, match="served_model_name"):
        EngineArgs.from_kwargs(served_model_name="x")


def test_max_num_batched_tokens_default_is_resolved_in_one_place(monkeypatch) -> None:
    monkeypatch.setattr(platform, "is_cuda", lambda: False)
    assert EngineArgs()._resolve_max_num_batched_tokens() == 2048
    monkeypatch.setattr(platform, "is_cuda", lambda: True)
    assert EngineArgs()._resolve_max_num_batched_tokens() == 8192
    assert EngineArgs(max_num_batched_tokens=96)._resolve_max_num_batched_tokens() == 96


def test_engine_config_of_a_tiny_model(tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    config = EngineArgs(
        model=folder, dtype="float32", kv_cache_memory="4MiB", max_num_batched_tokens=64,
        long_prefill_token_threshold=8, max_num_queued_requests=3,
    ).create_engine_config()
    scheduler = config.scheduler_config
    assert scheduler.max_num_batched_tokens == 64
    assert scheduler.long_prefill_token_threshold == 8
    assert scheduler.max_num_queued_requests == 3
    assert config.model_config.model == folder
    default = EngineArgs(model=folder, dtype="float32", kv_cache_memory="4MiB")
    assert default.create_engine_config().scheduler_config.long_prefill_token_threshold == 0
    with pytest.raises(ValueError, match="max_num_queued_requests"):
        EngineArgs(model=folder, max_num_queued_requests=-1).create_engine_config()


def test_llm_chat_uses_the_models_template_or_the_override(tiny_model_dir) -> None:
    from pagedserve import LLM, SamplingParams
    from pagedserve.transformers_utils.tokenizer import load_tokenizer

    folder = tiny_model_dir("qwen3")
    llm = LLM(model=folder, dtype="float32", kv_cache_memory="4MiB")
    messages = [{"role": "user", "content": "hello world"}]
    params = SamplingParams(temperature=0.0, max_tokens=2)
    own = llm.chat(messages, params, use_tqdm=False)[0]
    expected = load_tokenizer(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert own.prompt == expected
    override = llm.chat(messages, params, use_tqdm=False,
                        chat_template="Q: {{ messages[0].content }}\nA:")[0]
    assert override.prompt == "Q: hello world\nA:"
