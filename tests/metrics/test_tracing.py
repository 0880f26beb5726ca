"""Tracing: real spans built by RequestTracer, exported over OTLP/HTTP to a real receiver."""

from __future__ import annotations

import json

import pytest

from pagedserve.metrics.tracing import RequestTracer, RequestTraceRecord, extract_trace_headers
from tests.metrics.otlp_receiver import OTLPReceiver

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"


def _record(**overrides) -> RequestTraceRecord:  # noqa: ANN003
    fields = dict(
        request_id="cmpl-123", operation="text_completion", model="tiny", start_time=1000.0,
        end_time=1002.5,
        params={"max_tokens": 8, "temperature": 0.0, "top_p": 0.9, "top_k": 40, "seed": 7,
                "n": 1, "stop": None},
        finish_reasons=["length"], num_prompt_tokens=12, num_completion_tokens=8,
        num_cached_tokens=4, time_in_queue=0.25, time_to_first_token=0.5, e2e=2.5,
        time_in_model_prefill=0.25, time_in_model_decode=2.0, time_in_model_inference=2.25,
        prompt="Hello there", outputs=["General Kenobi"],
    )
    fields.update(overrides)
    return RequestTraceRecord(**fields)


def test_span_exported_with_parent_and_both_conventions() -> None:
    with OTLPReceiver() as receiver:
        tracer = RequestTracer(receiver.endpoint, service_name="pagedserve-test")
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01", "x-other": "1"}
        tracer.record(_record(), headers)
        tracer.record(_record(request_id="cmpl-orphan"), None)
        assert tracer.force_flush()
        spans = receiver.wait_for(2)
        tracer.shutdown()
    assert receiver.paths[0] == "/v1/traces"
    span = next(s for s in spans if s["attributes"]["gen_ai.response.id"] == "cmpl-123")
    assert span["trace_id"] == TRACE_ID and span["parent_span_id"] == PARENT_SPAN_ID
    assert span["name"] == "text_completion tiny"
    assert span["kind"] == 2  # SPAN_KIND_SERVER
    assert span["start_ns"] == 1000 * 10**9 and span["end_ns"] == 1002_500_000_000
    assert span["resource"]["service.name"] == "pagedserve-test"
    a = span["attributes"]
    expected = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 8,
        "gen_ai.request.temperature": 0.0,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.top_k": 40,
        "gen_ai.request.seed": 7,
        "gen_ai.response.id": "cmpl-123",
        "gen_ai.response.finish_reasons": ["length"],
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 8,
        "gen_ai.usage.prompt_tokens": 12,
        "gen_ai.usage.completion_tokens": 8,
        "gen_ai.latency.time_in_queue": 0.25,
        "gen_ai.latency.time_to_first_token": 0.5,
        "gen_ai.latency.e2e": 2.5,
        "gen_ai.latency.time_in_model_prefill": 0.25,
        "gen_ai.latency.time_in_model_decode": 2.0,
        "openinference.span.kind": "LLM",
        "llm.model_name": "tiny",
        "llm.token_count.prompt": 12,
        "llm.token_count.completion": 8,
        "llm.token_count.total": 20,
        "llm.token_count.prompt_details.cache_read": 4,
    }
    for key, want in expected.items():
        assert a[key] == want, key
    assert json.loads(a["llm.invocation_parameters"]) == {
        "max_tokens": 8, "temperature": 0.0, "top_p": 0.9, "top_k": 40, "seed": 7, "n": 1}
    # No text without the opt-in.
    assert not [k for k in a if k.startswith(("input.", "output.", "llm.input_messages",
                                              "llm.output_messages", "gen_ai.input",
                                              "gen_ai.output"))]
    orphan = next(s for s in spans if s["attributes"]["gen_ai.response.id"] == "cmpl-orphan")
    assert orphan["parent_span_id"] == "" and orphan["trace_id"] != TRACE_ID


def test_text_only_with_opt_in() -> None:
    with OTLPReceiver() as receiver:
        tracer = RequestTracer(receiver.endpoint + "/v1/traces", collect_text=True)
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        tracer.record(_record(operation="chat", prompt=messages, outputs=["Hello!"]))
        tracer.record(_record(request_id="c2", finish_reasons=["error"], error="boom"))
        tracer.force_flush()
        spans = receiver.wait_for(2)
        tracer.shutdown()
    chat = next(s for s in spans if s["name"] == "chat tiny")
    a = chat["attributes"]
    assert a["llm.input_messages.0.message.role"] == "system"
    assert a["llm.input_messages.1.message.content"] == "Hi"
    assert a["llm.output_messages.0.message.content"] == "Hello!"
    assert a["output.value"] == "Hello!"
    assert json.loads(a["input.value"]) == messages
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == "Hello!"
    failed = next(s for s in spans if s["attributes"]["gen_ai.response.id"] == "c2")
    assert failed["status_code"] == 2  # STATUS_CODE_ERROR
    assert failed["attributes"]["input.value"] == "Hello there"


def test_bad_endpoint_and_headers() -> None:
    with pytest.raises(ValueError, match="otlp-traces-endpoint"):
        RequestTracer("localhost:4318")
    assert extract_trace_headers({"content-type": "x"}) is None
    assert extract_trace_headers({"Traceparent": "00-a-b-01"}) == {"traceparent": "00-a-b-01"}
