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
from pagedserve import envs
from pagedserve.engine.arg_utils import EngineArgs
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
from pagedserve.entrypoints.openai.server_config import ServerConfig
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedserve.entrypoints.openai.serving_common import ServerContext
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger(__name__)

# After the engine dies, keep answering (500s, /health 503) this long before exiting.


def _guarded(path: str) -> bool:
    """Paths that need the API key: the OpenAI API and the admin endpoints."""
    return path.startswith("/v1") or path == "/reset_prefix_cache"


class APIKeyMiddleware:
    """401 on /v1/* and admin endpoints without ``Authorization: Bearer <key>``.

    Pure ASGI, so streaming responses pass through untouched.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") != "OPTIONS"
            and _guarded(str(scope.get("path", "")))
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

    _add_engine_routes(app, ctx)
    _add_tokenizer_routes(app, ctx, completion, chat)
    return app


def _add_engine_routes(app: FastAPI, ctx: ServerContext) -> None:
    """/health, /reset_prefix_cache, /metrics, /version, /v1/models."""
    engine = ctx.engine
    observability = ctx.observability

    @app.get("/health")
    async def health() -> Response:
        health = engine.health()
        stats = health.scheduler_stats
        body: dict[str, Any] = {
            "status": health.status,
            "engine_pid": health.engine_pid,
            "seconds_since_heartbeat": round(health.seconds_since_heartbeat, 3),
            "num_requests_running": stats.num_running_reqs if stats else 0,
            "num_requests_waiting": stats.num_waiting_reqs if stats else 0,
            "kv_cache_usage": stats.kv_cache_usage if stats else 0.0,
        }
        return JSONResponse(body, status_code=200 if health.healthy else 503)

    @app.post("/reset_prefix_cache")
    @_answer_errors
    async def reset_prefix_cache() -> Response:
        """Drop cached prefix blocks (as vLLM's endpoint); 409 while blocks are in use."""
        if await engine.reset_prefix_cache():
            return Response(status_code=200)
        raise OpenAIError(
            "Cannot reset the prefix cache while requests hold cached blocks; retry when idle.",
            HTTPStatus.CONFLICT,
        )

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


def _add_tokenizer_routes(
    app: FastAPI, ctx: ServerContext, completion: OpenAIServingCompletion,
    chat: OpenAIServingChat,
) -> None:
    """/tokenize (a prompt, or chat messages rendered with the template) and /detokenize."""
    engine = ctx.engine

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
        engine.input_processor.check_token_ids(request.tokens, "tokens")
        return {"prompt": ctx.tokenizer.decode(request.tokens)}


# --------------------------------------------------------------------------- running
def _engine_args(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs of the serve flags (the positional model and --model must agree)."""
    from pagedserve.entrypoints.engine_flags import engine_args_from_flags

    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(
            f"Two models given: {args.model_tag!r} (positional) and --model {args.model!r}"
        )
    if args.model_tag is not None:
        args.model = args.model_tag
    return engine_args_from_flags(args)


def _resolve_chat_template(
    engine: AsyncLLM, server_config: ServerConfig
) -> tuple[str | None, str | None]:
    """(template, None), or (None, why) when chat completions cannot be served.

    --chat-template wins; else the model's own template (its tokenizer folder), else the
    built-in template of the model family.
    """
    from pagedserve.transformers_utils.chat_templates import resolve_model_chat_template

    model_config = engine.model_config
    try:
        template = resolve_model_chat_template(
            engine.get_tokenizer(),
            model_config.tokenizer_path,
            getattr(model_config.hf_config, "model_type", ""),
            server_config.chat_template,
        )
        return template, None
    except ValueError as exc:
        logger.warning("chat completions are unavailable: %s", exc)
        return None, str(exc)


def _banner(engine: AsyncLLM, server_config: ServerConfig) -> str:
    import torch

    from pagedserve.entrypoints.engine_flags import describe_engine

    info = engine.engine_core.ready_info
    # describe_engine reports this process's torch threads: show the engine core's.
    api_threads = torch.get_num_threads()
    torch.set_num_threads(info.num_threads)
    try:
        text = describe_engine(engine.engine_config, info, info.load_seconds)
    finally:
        torch.set_num_threads(api_threads)
    return (
        f"pagedserve {pagedserve.__version__}: serving "
        f"{', '.join(server_config.served_model_names)} on "
        f"http://{server_config.host}:{server_config.port} (OpenAI API under /v1; docs at /docs)\n"
        f"{text}\nengine core: pid {info.pid}"
    )


async def _serve(server: uvicorn.Server, ctx: ServerContext, state: dict[str, Any]) -> None:
    engine = ctx.engine
    loop = asyncio.get_running_loop()

    def on_engine_dead(error: EngineDeadError) -> None:
        state["engine_dead"] = error
        # After the engine dies, keep answering (500s, /health 503) this long before exiting.
        delay = envs.PAGEDSERVE_DEAD_ENGINE_EXIT_DELAY
        logger.error("the engine core died; shutting the server down in %.1f s", delay)

        def stop() -> None:
            server.should_exit = True

        loop.call_later(delay, stop)

    engine.on_engine_dead = on_engine_dead
    engine.start()
    try:
        await server.serve()
    finally:
        await engine.shutdown()
        if ctx.observability is not None:
            ctx.observability.shutdown()  # flushes pending spans


def _make_observability(
    args: argparse.Namespace, engine_config: Any, server_config: ServerConfig
) -> Any:
    """Metrics, stats log line and tracing from the serve flags, labelled with the served
    model name."""
    from pagedserve.entrypoints.observability_args import observability_config_from_args
    from pagedserve.metrics.observability import EngineObservability

    config = observability_config_from_args(args)
    if config.log_stats:
        # The periodic stats line is INFO (as vLLM's); show it at the default log level.
        logging.getLogger("pagedserve.metrics.loggers").setLevel(logging.INFO)
    return EngineObservability(engine_config, config, model_name=server_config.model_name)


def run_server(args: argparse.Namespace) -> int:
    """Start the engine core, then serve HTTP until SIGTERM/SIGINT or engine death."""
    import torch

    engine_args = _engine_args(args)
    server_config = ServerConfig.from_args(args, model=engine_args.model)
    start = time.perf_counter()
    engine_config = engine_args.create_engine_config()
    observability = _make_observability(args, engine_config, server_config)
    engine = AsyncLLM(engine_config, observability=observability)
    # The engine core owns the cores; this process does light Python work.
    torch.set_num_threads(1)
    try:
        template, template_error = _resolve_chat_template(engine, server_config)
        ctx = ServerContext(
            engine=engine,
            server_config=server_config,
            chat_template=template,
            chat_template_error=template_error,
            observability=observability,
        )
        app = build_app(ctx)
        print(_banner(engine, server_config), file=sys.stderr)
        print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        config = uvicorn.Config(
            app,
            host=server_config.host,
            port=server_config.port,
            log_level=server_config.uvicorn_log_level,
            access_log=not server_config.disable_uvicorn_access_log,
            timeout_graceful_shutdown=max(1, int(server_config.shutdown_timeout)),
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
