"""OpenTelemetry tracing: one span per request, exported over OTLP.

``--otlp-traces-endpoint URL`` turns it on. Each finished request becomes one span,
built after the fact from the request's timestamps (nothing is traced on the per-token
path), parented from the incoming W3C ``traceparent``/``tracestate`` headers, and
exported in the background by a BatchSpanProcessor of a TracerProvider that belongs to
this tracer (the process-global provider is left alone).

Attributes follow both conventions operators use:

- OpenTelemetry GenAI, plus vLLM's own names: ``gen_ai.operation.name``,
  ``gen_ai.request.model/max_tokens/temperature/top_p/top_k/seed``,
  ``gen_ai.response.id/finish_reasons``, ``gen_ai.usage.input_tokens/output_tokens`` and
  ``gen_ai.usage.prompt_tokens/completion_tokens``,
  ``gen_ai.latency.time_in_queue/time_to_first_token/e2e/time_in_model_prefill/
  time_in_model_decode/time_in_model_inference`` (seconds);
- OpenInference: ``openinference.span.kind=LLM``, ``llm.model_name``,
  ``llm.token_count.prompt/completion/total``, ``llm.token_count.prompt_details.cache_read``,
  ``llm.invocation_parameters`` (JSON).

Prompt and output text (``input.value``/``output.value``, ``llm.input_messages.*``,
``gen_ai.input.messages``/``gen_ai.output.messages``) only with ``collect_text=True``.

The protocol is ``http/protobuf`` unless ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (or
``OTEL_EXPORTER_OTLP_PROTOCOL``) says ``grpc`` and the gRPC exporter is installed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")
SPAN_KIND_LLM = "LLM"


class SpanAttributes:
    """Attribute names (GenAI + vLLM, OpenInference)."""

    GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
    GEN_AI_SYSTEM = "gen_ai.system"
    GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
    GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
    GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
    GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
    GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
    GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
    GEN_AI_REQUEST_ID = "gen_ai.request.id"
    GEN_AI_REQUEST_N = "gen_ai.request.n"
    GEN_AI_RESPONSE_ID = "gen_ai.response.id"
    GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    GEN_AI_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    GEN_AI_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    GEN_AI_USAGE_NUM_SEQUENCES = "gen_ai.usage.num_sequences"
    GEN_AI_LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    GEN_AI_LATENCY_E2E = "gen_ai.latency.e2e"
    GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
    GEN_AI_LATENCY_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
    GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"
    GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
    GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"

    OPENINFERENCE_SPAN_KIND = "openinference.span.kind"
    LLM_MODEL_NAME = "llm.model_name"
    LLM_SYSTEM = "llm.system"
    LLM_TOKEN_COUNT_PROMPT = "llm.token_count.prompt"
    LLM_TOKEN_COUNT_COMPLETION = "llm.token_count.completion"
    LLM_TOKEN_COUNT_TOTAL = "llm.token_count.total"
    LLM_TOKEN_COUNT_PROMPT_CACHE_READ = "llm.token_count.prompt_details.cache_read"
    LLM_INVOCATION_PARAMETERS = "llm.invocation_parameters"
    INPUT_VALUE = "input.value"
    INPUT_MIME_TYPE = "input.mime_type"
    OUTPUT_VALUE = "output.value"
    OUTPUT_MIME_TYPE = "output.mime_type"


@dataclass
class RequestTraceRecord:
    """Everything one request's span says; times are ``time.time()`` seconds."""

    request_id: str
    operation: str  # "chat" or "text_completion"
    model: str
    start_time: float
    end_time: float
    params: dict[str, Any] = field(default_factory=dict)
    finish_reasons: list[str] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    n: int = 1
    time_in_queue: float | None = None
    time_to_first_token: float | None = None
    e2e: float | None = None
    time_in_model_prefill: float | None = None
    time_in_model_decode: float | None = None
    time_in_model_inference: float | None = None
    # Only exported with collect_text: a prompt string or a list of chat messages.
    prompt: str | list[dict[str, Any]] | None = None
    outputs: list[str] | None = None
    error: str | None = None


@dataclass
class RequestTraceContext:
    """What the HTTP layer knows of a request for its span: set on the engine request."""

    headers: dict[str, str] | None
    operation: str  # "chat" or "text_completion"
    model: str
    # The prompt as the client sent it (text or chat messages); kept only with collect_text.
    prompt: str | list[dict[str, Any]] | None = None


def extract_trace_headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    """The W3C trace-context headers of a request (lower-cased), or None if it has none."""
    if not headers:
        return None
    found = {}
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if value is None:
            value = headers.get(name.title())
        if value:
            found[name] = value
    return found or None


def is_otel_available() -> bool:
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def _normalize_http_endpoint(endpoint: str) -> str:
    parsed = urlparse(endpoint)
    if not parsed.scheme or not parsed.netloc:
        raise ValueError(
            f"--otlp-traces-endpoint must be a URL like http://127.0.0.1:4318, got {endpoint!r}"
        )
    if parsed.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def _make_exporter(endpoint: str, protocol: str | None) -> Any:
    protocol = (
        protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError as exc:
            raise ValueError(
                "OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc "
                "(pip install opentelemetry-exporter-otlp-proto-grpc), or use http/protobuf"
            ) from exc
        return GrpcSpanExporter(endpoint=endpoint)
    if protocol not in ("http/protobuf", "http"):
        raise ValueError(f"OTLP protocol must be 'http/protobuf' or 'grpc', got {protocol!r}")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=_normalize_http_endpoint(endpoint))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class RequestTracer:
    """Builds and exports one span per finished request."""

    def __init__(
        self,
        endpoint: str | None,
        service_name: str = "pagedserve",
        collect_text: bool = False,
        protocol: str | None = None,
        exporter: Any | None = None,
        batch: bool = True,
    ) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:  # pragma: no cover - the SDK is a dependency
            raise ValueError(
                "tracing needs opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http"
            ) from exc
        if exporter is None:
            if not endpoint:
                raise ValueError("an OTLP traces endpoint is required")
            exporter = _make_exporter(endpoint, protocol)
        self.endpoint = endpoint
        self.collect_text = collect_text
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        from pagedserve import __version__

        self.tracer = self.provider.get_tracer("pagedserve", __version__)
        self.propagator = TraceContextTextMapPropagator()

    def record(
        self, record: RequestTraceRecord, trace_headers: Mapping[str, str] | None = None
    ) -> None:
        """Export the span of one finished request (parent from its trace headers)."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        context = None
        carrier = extract_trace_headers(trace_headers)
        if carrier:
            context = self.propagator.extract(carrier=carrier)
        span = self.tracer.start_span(
            f"{record.operation} {record.model}",
            context=context,
            kind=SpanKind.SERVER,
            start_time=_ns(record.start_time),
            attributes=self.attributes(record),
        )
        if record.error is not None:
            span.set_status(Status(StatusCode.ERROR, record.error))
        span.end(end_time=_ns(max(record.end_time, record.start_time)))

    def attributes(self, record: RequestTraceRecord) -> dict[str, Any]:
        """The span's attributes (None values left out, as OTel requires)."""
        a = SpanAttributes
        params = {k: v for k, v in record.params.items() if v is not None}
        total = record.num_prompt_tokens + record.num_completion_tokens
        attrs: dict[str, Any] = {
            a.GEN_AI_OPERATION_NAME: record.operation,
            a.GEN_AI_SYSTEM: "pagedserve",
            a.GEN_AI_PROVIDER_NAME: "pagedserve",
            a.GEN_AI_REQUEST_MODEL: record.model,
            a.GEN_AI_RESPONSE_MODEL: record.model,
            a.GEN_AI_REQUEST_ID: record.request_id,
            a.GEN_AI_RESPONSE_ID: record.request_id,
            a.GEN_AI_REQUEST_N: record.n,
            a.GEN_AI_USAGE_NUM_SEQUENCES: record.n,
            a.GEN_AI_RESPONSE_FINISH_REASONS: [str(r) for r in record.finish_reasons],
            a.GEN_AI_USAGE_INPUT_TOKENS: record.num_prompt_tokens,
            a.GEN_AI_USAGE_OUTPUT_TOKENS: record.num_completion_tokens,
            a.GEN_AI_USAGE_PROMPT_TOKENS: record.num_prompt_tokens,
            a.GEN_AI_USAGE_COMPLETION_TOKENS: record.num_completion_tokens,
            a.OPENINFERENCE_SPAN_KIND: SPAN_KIND_LLM,
            a.LLM_MODEL_NAME: record.model,
            a.LLM_SYSTEM: "pagedserve",
            a.LLM_TOKEN_COUNT_PROMPT: record.num_prompt_tokens,
            a.LLM_TOKEN_COUNT_COMPLETION: record.num_completion_tokens,
            a.LLM_TOKEN_COUNT_TOTAL: total,
            a.LLM_TOKEN_COUNT_PROMPT_CACHE_READ: record.num_cached_tokens,
            a.LLM_INVOCATION_PARAMETERS: json.dumps(params, sort_keys=True, default=str),
        }
        for key, name in (
            ("max_tokens", a.GEN_AI_REQUEST_MAX_TOKENS),
            ("temperature", a.GEN_AI_REQUEST_TEMPERATURE),
            ("top_p", a.GEN_AI_REQUEST_TOP_P),
            ("top_k", a.GEN_AI_REQUEST_TOP_K),
            ("seed", a.GEN_AI_REQUEST_SEED),
        ):
            value = params.get(key)
            if value is not None:
                attrs[name] = value
        for value, name in (
            (record.time_in_queue, a.GEN_AI_LATENCY_TIME_IN_QUEUE),
            (record.time_to_first_token, a.GEN_AI_LATENCY_TIME_TO_FIRST_TOKEN),
            (record.e2e, a.GEN_AI_LATENCY_E2E),
            (record.time_in_model_prefill, a.GEN_AI_LATENCY_TIME_IN_MODEL_PREFILL),
            (record.time_in_model_decode, a.GEN_AI_LATENCY_TIME_IN_MODEL_DECODE),
            (record.time_in_model_inference, a.GEN_AI_LATENCY_TIME_IN_MODEL_INFERENCE),
        ):
            if value is not None:
                attrs[name] = float(value)
        if self.collect_text:
            attrs.update(self._text_attributes(record))
        return attrs

    def _text_attributes(self, record: RequestTraceRecord) -> dict[str, Any]:
        a = SpanAttributes
        attrs: dict[str, Any] = {}
        if isinstance(record.prompt, str):
            attrs[a.INPUT_VALUE] = record.prompt
            attrs[a.INPUT_MIME_TYPE] = "text/plain"
            attrs[a.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": record.prompt}]}])
        elif record.prompt is not None:
            attrs[a.INPUT_VALUE] = json.dumps(record.prompt, default=str)
            attrs[a.INPUT_MIME_TYPE] = "application/json"
            attrs[a.GEN_AI_INPUT_MESSAGES] = json.dumps(
                [
                    {"role": m.get("role"),
                     "parts": [{"type": "text", "content": _message_text(m)}]}
                    for m in record.prompt
                ],
                default=str,
            )
            for i, message in enumerate(record.prompt):
                attrs[f"llm.input_messages.{i}.message.role"] = str(message.get("role"))
                attrs[f"llm.input_messages.{i}.message.content"] = _message_text(message)
        if record.outputs is not None:
            attrs[a.OUTPUT_VALUE] = record.outputs[0] if len(record.outputs) == 1 else (
                json.dumps(record.outputs))
            attrs[a.OUTPUT_MIME_TYPE] = "text/plain" if len(record.outputs) == 1 else (
                "application/json")
            attrs[a.GEN_AI_OUTPUT_MESSAGES] = json.dumps(
                [
                    {"role": "assistant", "parts": [{"type": "text", "content": text}],
                     "finish_reason": (record.finish_reasons[i]
                                       if i < len(record.finish_reasons) else None)}
                    for i, text in enumerate(record.outputs)
                ]
            )
            for i, text in enumerate(record.outputs):
                attrs[f"llm.output_messages.{i}.message.role"] = "assistant"
                attrs[f"llm.output_messages.{i}.message.content"] = text
        return attrs

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        return bool(self.provider.force_flush(timeout_millis))

    def shutdown(self) -> None:
        try:
            self.provider.shutdown()
        except Exception:  # pragma: no cover - exporter errors at exit are not fatal
            logger.exception("tracer shutdown failed")


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, Mapping)
        )
    return str(content)
