"""Errors of the OpenAI-compatible API: one body shape, the right HTTP status.

Every error answers ``{"error": {"message", "type", "param", "code"}}`` with ``code``
the HTTP status, as vLLM does: 400 for bad input (never FastAPI's 422), 401, 404,
429 (with Retry-After), 500 when the engine fails, 503 while it is unavailable.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve.engine.core_client import EngineDeadError
from pagedserve.engine.input_processor import InvalidRequestError, QueueFullError

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}
# Seconds a client should wait after a 429.
RETRY_AFTER_S = 1
_PARAM_RE = re.compile(r"^[`'\"]?([a-z_]+)[`'\"]? (?:must|is|are|keys)\b")


class OpenAIError(Exception):
    """An error the API answers with its status and OpenAI's error body."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        param: str | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.err_type = err_type or _ERROR_TYPES.get(self.status, "Error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.param, self.status)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, err_type: str, param: str | None, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def guess_param(message: str) -> str | None:
    """The parameter a validation message is about ("top_p must be ..." -> "top_p")."""
    match = _PARAM_RE.match(message)
    return match.group(1) if match else None


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map an exception from validation or the engine to its API error."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, QueueFullError):
        return OpenAIError(
            str(exc), HTTPStatus.TOO_MANY_REQUESTS, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    if isinstance(exc, EngineDeadError):
        return OpenAIError(
            f"The engine is dead and cannot serve requests: {exc}",
            HTTPStatus.INTERNAL_SERVER_ERROR,
        )
    if isinstance(exc, InvalidRequestError):
        return OpenAIError(str(exc), HTTPStatus.BAD_REQUEST, param=exc.param)
    if isinstance(exc, ValueError | TypeError | OverflowError):
        # Parameter-range errors (SamplingParams, the request body) say the name first.
        message = str(exc)
        return OpenAIError(message, HTTPStatus.BAD_REQUEST, param=guess_param(message))
    logger.error("internal error", exc_info=exc)
    return OpenAIError(
        f"Internal server error: {type(exc).__name__}: {exc}", HTTPStatus.INTERNAL_SERVER_ERROR
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"Malformed JSON in the request body: {ctx.get('error', 'invalid JSON')}", None
    parts = []
    param = None
    for error in errors[:5]:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        # Drop pydantic's union-branch names (e.g. "str", "list[int]") from the location.
        loc = [p for p in loc if not re.match(r"^(str|int|float|list\[.*\]|dict\[.*\])$", p)]
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid value')}")
    return "Invalid request: " + "; ".join(parts), param


def install_exception_handlers(app: FastAPI) -> None:
    """400 instead of 422; OpenAI's body for HTTP errors and unexpected failures."""

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return OpenAIError(message, HTTPStatus.BAD_REQUEST, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        error = OpenAIError(detail, exc.status_code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(OpenAIError)
    async def _on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        return to_openai_error(exc).response()
