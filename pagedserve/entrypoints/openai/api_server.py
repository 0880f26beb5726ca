"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): `pagedserve serve`.

The API process does HTTP, chat templates, tokenization and detokenization; the engine
core runs in its own process (AsyncLLM + AsyncMPClient). SIGTERM stops accepting
connections, lets in-flight requests finish (bounded by --shutdown-timeout) and exits 0.
If the engine core dies, in-flight requests get an error, /health answers 503, and the
server exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

import pagedserve
from pagedserve.engine.async_llm import AsyncLLM
from pagedserve.engine.core_client import EngineDeadError
from pagedserve.entrypoints.openai.errors import (
    OpenAIError,
    install_exception_handlers,
    to_openai_error,
)
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_common import ServerContext
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger(__name__)

# After the engine dies, keep answering (500s, /health 503) this long before exiting.
DEAD_ENGINE_EXIT_DELAY_S = float(os.environ.get("PAGEDSERVE_DEAD_ENGINE_EXIT_DELAY", "2.0"))


class APIKeyMiddleware:
    """401 on /v1/* without ``Authorization: Bearer <key>`` (pure ASGI: streaming-safe)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"
            and str(scope.get("path", "")).startswith("/v1")
        ):
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = OpenAIError(
                    "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                    HTTPStatus.UNAUTHORIZED,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _answer_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn exceptions into OpenAI error responses inside the route.

    (Starlette's catch-all handler answers too, but then re-raises, and uvicorn drops
    the keep-alive connection.)
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except Exception as exc:
            return to_openai_error(exc).response()

    return wrapper


def build_app(ctx: ServerContext) -> FastAPI:
    """The FastAPI application over a running AsyncLLM."""
    app = FastAPI(
        title="pagedserve",
        description="OpenAI-compatible API of the pagedserve engine",
        version=pagedserve.__version__,
    )
    app.state.ctx = ctx
    install_exception_handlers(app)
    if ctx.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ctx.api_key)
    observability = ctx.observability
    if observability is not None:
        from pagedserve.metrics.prometheus import PrometheusMiddleware

        # Outermost: counts every request, 401s included.
        app.add_middleware(PrometheusMiddleware, http_metrics=observability.http_metrics)
    completion = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)
    engine = ctx.engine

    @app.get("/health")
    async def health() -> Response:
        client = engine.engine_core
        stats = engine.scheduler_stats
        alive = engine.is_alive()
        dead = engine.errored or not client.process.is_alive()
        body: dict[str, Any] = {
            "status": "ok" if alive else ("dead" if dead else "stalled"),
            "engine_pid": client.engine_pid,
            "seconds_since_heartbeat": round(client.seconds_since_heartbeat(), 3),
            "num_requests_running": stats.num_running_reqs if stats else 0,
            "num_requests_waiting": stats.num_waiting_reqs if stats else 0,
            "kv_cache_usage": stats.kv_cache_usage if stats else 0.0,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition (pagedserve: names; vllm: too with --metrics-compat vllm)."""
        if observability is None:
            return Response("", media_type="text/plain; version=0.0.4; charset=utf-8")
        from pagedserve.metrics.observability import METRICS_CONTENT_TYPE

        body = observability.metrics_text(engine.scheduler_stats)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagedserve.__version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(ctx.started)
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "pagedserve",
                    "root": ctx.model_config.model,
                    "parent": None,
                    "max_model_len": ctx.max_model_len,
                }
                for name in ctx.served_model_names
            ],
        }

    @app.post("/v1/completions")
    @_answer_errors
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Response:
        return await completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    @_answer_errors
    async def create_chat_completion(
        request: ChatCompletionRequest, raw_request: Request
    ) -> Response:
        return await chat.create_chat_completion(request, raw_request)

    @app.post("/tokenize")
    @_answer_errors
    async def tokenize(request: TokenizeRequest) -> Any:
        completion.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("Give exactly one of 'prompt' or 'messages'.", param="prompt")
        if request.messages is not None:
            prompt = chat.render(
                request.messages,
                request.chat_template,
                request.add_generation_prompt,
                request.continue_final_message,
                request.chat_template_kwargs,
                request.tools,
                request.add_special_tokens,
            )
            token_ids = prompt.prompt_token_ids
        else:
            add_special = True if request.add_special_tokens is None else request.add_special_tokens
            token_ids = completion.tokenize(request.prompt or "", add_special)
        body: dict[str, Any] = {
            "count": len(token_ids),
            "max_model_len": ctx.max_model_len,
            "tokens": token_ids,
            "token_strs": None,
        }
        if request.return_token_strs:
            body["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(token_ids)
        return body

    @app.post("/detokenize")
    @_answer_errors
    async def detokenize(request: DetokenizeRequest) -> Any:
        completion.check_model(request.model)
        completion.check_ids(request.tokens)
        return {"prompt": ctx.tokenizer.decode(request.tokens)}

    return app


# --------------------------------------------------------------------------- running
def _load_chat_template(value: str | None) -> str | None:
    if value is not None and os.path.isfile(value):
        with open(value) as f:
            return f.read()
    return value


def _engine_args(args: argparse.Namespace) -> Any:
    from pagedserve.entrypoints.engine_flags import engine_args_from_flags

    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(
            f"Two models given: {args.model_tag!r} (positional) and --model {args.model!r}"
        )
    if args.model_tag is not None:
        args.model = args.model_tag
    if args.max_num_queued_requests < 0:
        raise ValueError("--max-num-queued-requests must be >= 0 (0: unbounded)")
    engine_args = engine_args_from_flags(args)
    engine_args.max_num_queued_requests = args.max_num_queued_requests
    engine_args.chat_template = _load_chat_template(args.chat_template)
    if args.served_model_name:
        engine_args.served_model_name = args.served_model_name[0]
    return engine_args


def _resolve_chat_template(engine: AsyncLLM) -> tuple[str | None, str | None]:
    try:
        from pagedserve.engine.chat_utils import resolve_chat_template

        model_config = engine.model_config
        template = resolve_chat_template(
            engine.get_tokenizer(),
            getattr(model_config.hf_config, "model_type", ""),
            model_config.chat_template,
        )
        return template, None
    except (ValueError, ImportError) as exc:
        logger.warning("chat completions are unavailable: %s", exc)
        return None, str(exc)


def _banner(engine: AsyncLLM, args: argparse.Namespace, served_names: list[str]) -> str:
    import torch

    from pagedserve.entrypoints.engine_flags import describe_engine

    info = engine.engine_core.ready_info
    # describe_engine reports this process's torch threads: show the engine core's.
    api_threads = torch.get_num_threads()
    torch.set_num_threads(info.num_threads)
    try:
        text = describe_engine(engine.engine_config, info.load_seconds)
    finally:
        torch.set_num_threads(api_threads)
    return (
        f"pagedserve {pagedserve.__version__}: serving {', '.join(served_names)} on "
        f"http://{args.host}:{args.port} (OpenAI API under /v1; docs at /docs)\n"
        f"{text}\nengine core: pid {info.pid}"
    )


async def _serve(server: uvicorn.Server, ctx: ServerContext, state: dict[str, Any]) -> None:
    engine = ctx.engine
    loop = asyncio.get_running_loop()

    def on_engine_dead(error: EngineDeadError) -> None:
        state["engine_dead"] = error
        logger.error("the engine core died; shutting the server down in %.1f s",
                     DEAD_ENGINE_EXIT_DELAY_S)

        def stop() -> None:
            server.should_exit = True

        loop.call_later(DEAD_ENGINE_EXIT_DELAY_S, stop)

    engine.on_engine_dead = on_engine_dead
    engine.start()
    try:
        await server.serve()
    finally:
        await engine.shutdown()
        if ctx.observability is not None:
            ctx.observability.shutdown()  # flushes pending spans


def _make_observability(args: argparse.Namespace, engine_config: Any) -> Any:
    """Metrics, stats log line and tracing from the serve flags."""
    from pagedserve.metrics.observability import (
        EngineObservability,
        observability_config_from_args,
    )

    config = observability_config_from_args(args)
    if config.log_stats:
        # The periodic stats line is INFO (as vLLM's); show it at the default log level.
        logging.getLogger("pagedserve.metrics.loggers").setLevel(logging.INFO)
    return EngineObservability(engine_config, config)


def run_server(args: argparse.Namespace) -> int:
    """Start the engine core, then serve HTTP until SIGTERM/SIGINT or engine death."""
    import torch

    engine_args = _engine_args(args)
    api_key = args.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None
    start = time.perf_counter()
    engine_config = engine_args.create_engine_config()
    observability = _make_observability(args, engine_config)
    engine = AsyncLLM(engine_config, observability=observability)
    # The engine core owns the cores; this process does light Python work.
    torch.set_num_threads(1)
    try:
        served_names = list(args.served_model_name or [engine.model_config.served_model_name])
        template, template_error = _resolve_chat_template(engine)
        ctx = ServerContext(
            engine=engine,
            served_model_names=served_names,
            chat_template=template,
            chat_template_error=template_error,
            api_key=api_key,
            observability=observability,
        )
        app = build_app(ctx)
        print(_banner(engine, args, served_names), file=sys.stderr)
        print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)),
            timeout_keep_alive=5,
        )
        server = uvicorn.Server(config)
        state: dict[str, Any] = {}
        # uvicorn re-raises the signal that stopped it once it is done; exit normally instead.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)
        asyncio.run(_serve(server, ctx, state))
    except BaseException:
        engine.shutdown_sync()
        raise
    engine.shutdown_sync()
    if "engine_dead" in state:
        print(f"error: the engine core died: {state['engine_dead']}", file=sys.stderr)
        return 1
    return 0
