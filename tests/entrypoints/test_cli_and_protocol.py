"""Model-free checks: `serve` flags and --config YAML, request bodies -> SamplingParams,
and the engine-core message round trip."""

from __future__ import annotations

import msgspec
import pytest

from pagedserve.engine.input_processor import InvalidRequestError, check_chat_options
from pagedserve.engine.messages import EngineCoreRequest
from pagedserve.entrypoints.cli import build_parser
from pagedserve.entrypoints.openai.errors import guess_param
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


def test_serve_flags_and_config_file(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "port: 1234\n"
        "max-num-seqs: 3\n"
        "enable_prefix_caching: false\n"
        "served-model-name: [a, b]\n"
        "api-key: secret\n"
    )
    parser = build_parser()
    args = parser.parse_args(["serve", "model.gguf", "--config", str(config), "--port", "9"])
    assert args.model_tag == "model.gguf"
    assert args.port == 9  # the command line wins over the file
    assert args.max_num_seqs == 3
    assert args.enable_prefix_caching is False
    assert args.served_model_name == ["a", "b"]
    assert args.api_key == "secret"
    assert args.host == "127.0.0.1"

    defaults = parser.parse_args(["serve"])
    assert (defaults.port, defaults.model_tag, defaults.max_num_queued_requests) == (8000, None, 0)

    config.write_text("no-such-flag: 1\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--config", str(config)])


def test_serve_flags_make_server_and_engine_configs(monkeypatch):
    """Front-end settings go to ServerConfig; engine knobs (the queue limit too) to EngineArgs."""
    from pagedserve.entrypoints.openai.api_server import _engine_args
    from pagedserve.entrypoints.openai.server_config import ServerConfig

    monkeypatch.delenv("PAGEDSERVE_API_KEY", raising=False)
    parser = build_parser()
    args = parser.parse_args([
        "serve", "model.gguf", "--served-model-name", "a", "b", "--chat-template", "t.jinja",
        "--port", "9", "--max-num-queued-requests", "4", "--revision", "r1",
        "--long-prefill-token-threshold", "32",
    ])
    engine_args = _engine_args(args)
    assert engine_args.model == "model.gguf" and engine_args.revision == "r1"
    assert engine_args.max_num_queued_requests == 4
    assert engine_args.long_prefill_token_threshold == 32
    config = ServerConfig.from_args(args, model=engine_args.model)
    assert config.served_model_names == ("a", "b") and config.model_name == "a"
    assert config.chat_template == "t.jinja" and config.port == 9 and config.api_key is None

    default = parser.parse_args(["serve"])
    assert ServerConfig.from_args(default, model=None).served_model_names == ("gemma-3-270m",)
    named = parser.parse_args(["serve", "org/model"])
    assert ServerConfig.from_args(named, model="org/model").served_model_names == ("org/model",)
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    assert ServerConfig.from_args(default, model=None).api_key == "from-env"
    with pytest.raises(ValueError, match="Two models"):
        _engine_args(parser.parse_args(["serve", "a", "--model", "b"]))
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="served_model_names"):
        ServerConfig(served_model_names=())


def test_completion_request_to_sampling_params():
    request = CompletionRequest(
        prompt="x", stream=True, logprobs=2, echo=True, logit_bias={"5": 500, "7": -3},
        top_k=40, stop="END", seed=3, unknown_field=1,
    )
    assert request.model_extra == {"unknown_field": 1}
    params = request.to_sampling_params(16)
    assert params.output_kind == RequestOutputKind.DELTA
    assert params.logprobs == 2 and params.prompt_logprobs == 2
    assert params.logit_bias == {5: 100.0, 7: -3.0}
    assert params.top_k == 40 and params.stop == ["END"] and params.seed == 3
    assert params.temperature == 1.0 and params.max_tokens == 16

    final = CompletionRequest(prompt=[1, 2]).to_sampling_params(16)
    assert final.output_kind == RequestOutputKind.FINAL_ONLY
    with pytest.raises(ValueError, match="Stream options"):
        CompletionRequest(prompt="x", stream_options={"include_usage": True}).to_sampling_params(4)


def test_chat_request_to_sampling_params():
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=3,
        max_tokens=50, max_completion_tokens=7,
    )
    assert request.requested_max_tokens == 7
    assert request.to_sampling_params(7).logprobs == 3
    assert ChatCompletionRequest(messages=[]).to_sampling_params(1).logprobs is None
    with pytest.raises(ValueError, match="top_logprobs"):
        ChatCompletionRequest(messages=[], top_logprobs=2).to_sampling_params(1)
    # Chat options are checked where every request comes in (the input processor).
    with pytest.raises(InvalidRequestError, match="continue_final_message") as info:
        check_chat_options(add_generation_prompt=True, continue_final_message=True)
    assert info.value.param == "continue_final_message"
    check_chat_options(add_generation_prompt=False, continue_final_message=True)


def test_guess_param():
    assert guess_param("top_p must be in (0, 1], got 5.") == "top_p"
    assert guess_param("logit_bias keys must be token ids") == "logit_bias"
    assert guess_param("The prompt cannot be empty") is None


def test_engine_core_request_round_trip():
    params = SamplingParams(
        temperature=0.5, stop=["x"], logit_bias={5: 1.0}, seed=3,
        output_kind=RequestOutputKind.DELTA, stop_token_ids=[7],
    )
    request = EngineCoreRequest("r", [1, 2, 3], params, 1.0, priority=2)
    decoded = msgspec.msgpack.Decoder(EngineCoreRequest).decode(
        msgspec.msgpack.Encoder().encode(request)
    )
    assert decoded.sampling_params.output_kind is RequestOutputKind.DELTA
    assert decoded.sampling_params.logit_bias == {5: 1.0}
    assert decoded.sampling_params.all_stop_token_ids == {7}
    for name in ("temperature", "stop", "seed", "stop_token_ids", "max_tokens", "top_k"):
        assert getattr(decoded.sampling_params, name) == getattr(params, name)
    assert (decoded.request_id, decoded.prompt_token_ids, decoded.priority) == ("r", [1, 2, 3], 2)
