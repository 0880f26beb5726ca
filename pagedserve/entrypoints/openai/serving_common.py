"""What completions and chat completions share: model check, request ids, usage, SSE
framing, and iterating engine outputs with abort on disconnect.

Prompt and parameter validation is not here: the engine's input processor does it
(``pagedserve.engine.input_processor``) for the API and the offline LLM alike."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedserve.engine.async_llm import AsyncLLM, RequestOutputCollector
from pagedserve.engine.input_processor import ProcessedPrompt
from pagedserve.entrypoints.openai.errors import OpenAIError
from pagedserve.entrypoints.openai.protocol import OpenAIBaseModel
from pagedserve.entrypoints.openai.server_config import ServerConfig
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Logprobs of -inf cannot be written as JSON; vLLM clamps them to this value.
MIN_LOGPROB = -9999.0


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> str:
    """One server-sent event, exactly as OpenAI frames it."""
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB) if value == value else MIN_LOGPROB


@dataclass
class ServerContext:
    """Everything request handlers need: the engine, the server's settings, the chat template."""

    engine: AsyncLLM
    server_config: ServerConfig
    # The chat template in use (--chat-template, else the model's own), or why there is none.
    chat_template: str | None = None
    chat_template_error: str | None = None
    started: float = field(default_factory=time.time)
    # Metrics, tracing and timings (pagedserve.metrics.observability.EngineObservability).
    observability: Any = None

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return self.server_config.served_model_names

    @property
    def api_key(self) -> str | None:
        return self.server_config.api_key

    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    @property
    def tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


class ServingBase:
    """Shared logic of the completion and chat handlers."""

    request_id_prefix = "cmpl"
    operation = "text_completion"  # gen_ai.operation.name of the request's span

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine

    # ---------------------------------------------------------------- checks
    def check_model(self, model: str | None) -> str:
        """The served name to report; 404 for a model this server does not serve."""
        if model is None or model == "" or model in self.ctx.served_model_names:
            return model or self.ctx.model_name
        raise OpenAIError(
            f"The model `{model}` does not exist.", HTTPStatus.NOT_FOUND, param="model"
        )

    def check_engine(self) -> None:
        if self.engine.errored:
            raise OpenAIError(
                "The engine is dead and cannot serve requests.", HTTPStatus.INTERNAL_SERVER_ERROR
            )

    def request_id(self, raw_request: Request, requested: str | None) -> str:
        base = requested or raw_request.headers.get("X-Request-Id") or uuid.uuid4().hex
        return f"{self.request_id_prefix}-{base}"

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.engine.input_processor.tokenize(text, add_special_tokens)

    def prompt_text(self, output: RequestOutput) -> str:
        """The prompt as text (decoded when it came as token ids, or was truncated)."""
        if output.prompt is not None:
            return output.prompt
        return self.ctx.tokenizer.decode(output.prompt_token_ids)

    def log_unknown_fields(self, request: OpenAIBaseModel) -> None:
        extra = request.model_extra
        if extra:
            logger.warning("ignoring unknown request field(s): %s", ", ".join(sorted(extra)))

    # ---------------------------------------------------------------- engine
    def add_requests(
        self,
        request_id: str,
        prompts: list[ProcessedPrompt],
        params_list: list[SamplingParams],
        priority: int,
        cache_salt: str | None = None,
        trace_contexts: list[Any] | None = None,
    ) -> list[tuple[str, RequestOutputCollector]]:
        """Add one engine request per prompt; all or nothing (the engine validates each)."""
        self.check_engine()
        self.engine.check_capacity(sum(p.n for p in params_list))
        added: list[tuple[str, RequestOutputCollector]] = []
        try:
            for index, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{index}"
                trace_context = trace_contexts[index] if trace_contexts else None
                added.append((rid, self.engine.add_request(
                    rid, prompt, params, priority, cache_salt, trace_context)))
        except BaseException:
            self.engine.abort([rid for rid, _ in added])
            raise
        return added

    # ---------------------------------------------------------------- observability
    def trace_contexts(
        self, raw_request: Request, model_name: str, prompts: Callable[[], list[Any]]
    ) -> list[Any] | None:
        """One span context per engine request (None when tracing is off).

        ``prompts()`` gives what the spans may show as input (called only when tracing).
        """
        obs = self.ctx.observability
        if obs is None or obs.tracer is None:
            return None
        return [obs.trace_context(raw_request.headers, self.operation, model_name, p)
                for p in prompts()]

    def wants_timings(self, request: Any) -> bool:
        requested = getattr(request, "return_timings", None)
        obs = self.ctx.observability
        return obs.wants_timings(requested) if obs is not None else bool(requested)

    def timings(self, outputs: list[RequestOutput], prompt_tokens: int, cached_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
        from pagedserve.metrics.observability import response_timings

        return response_timings(outputs, prompt_tokens, cached_tokens, completion_tokens)

    async def iterate(
        self, collectors: list[tuple[str, RequestOutputCollector]]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield (prompt index, output) from all requests until all finish.

        Whatever ends the iteration early (a disconnect, an error) aborts the unfinished
        requests, so their KV blocks return to the pool at once.
        """
        pending = dict(enumerate(collectors))
        try:
            while pending:
                produced = False
                for index, (_rid, collector) in list(pending.items()):
                    output = collector.get_nowait()
                    if output is None:
                        continue
                    produced = True
                    if output.finished:
                        del pending[index]
                    yield index, output
                if produced or not pending:
                    continue
                if len(pending) == 1:
                    (index, (_rid, collector)), = pending.items()
                    output = await collector.get()
                    if output.finished:
                        del pending[index]
                    yield index, output
                    continue
                waiters = [asyncio.ensure_future(c.ready.wait()) for _, c in pending.values()]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waiters:
                        waiter.cancel()
        finally:
            if pending:
                self.engine.abort([rid for rid, _ in pending.values()])


async def _listen_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnected(coro: Coroutine[Any, Any, T], raw_request: Request) -> T | None:
    """Run a handler coroutine; cancel it (aborting its requests) if the client leaves."""
    task: asyncio.Task[T] = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(_listen_for_disconnect(raw_request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        listener.cancel()
    if task.done():
        return task.result()
    logger.info("client disconnected; cancelling its request")
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    return None


class SSEResponse(StreamingResponse):
    """text/event-stream that stops (and aborts its requests) when the client leaves.

    Listens for the disconnect even between tokens (e.g. while a request waits in the
    queue), and always closes the body iterator so its ``finally`` blocks run now.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(
            content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as task_group:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        logger.info("client disconnected mid-stream")
                    finally:
                        task_group.cancel_scope.cancel()

                task_group.start_soon(stream)
                await _listen_for_disconnect(receive)
                task_group.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def prompt_logprobs_json(output: RequestOutput) -> list[Any] | None:
    """vLLM's prompt_logprobs: per prompt position None or {token_id: {logprob, rank, decoded_token}}."""
    if output.prompt_logprobs is None:
        return None
    result: list[Any] = []
    for entry in output.prompt_logprobs:
        if entry is None:
            result.append(None)
            continue
        result.append(
            {
                str(token_id): {
                    "logprob": clamp_logprob(lp.logprob),
                    "rank": lp.rank,
                    "decoded_token": lp.decoded_token,
                }
                for token_id, lp in entry.items()
            }
        )
    return result


def engine_failure(output: RequestOutput) -> OpenAIError | None:
    """A 500 if the engine failed any completion of this output."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            detail = f": {completion.stop_reason}" if isinstance(completion.stop_reason, str) else ""
            return OpenAIError(
                f"The engine failed to process request {output.request_id}{detail}",
                HTTPStatus.INTERNAL_SERVER_ERROR,
            )
    return None
