"""The one place that turns exceptions into HTTP responses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequest, OrchestratorError
from ..schemas import render_error
from .responses import TCIJSONResponse

log = structlog.get_logger(__name__)


def _respond(exc: OrchestratorError, extra: Mapping[str, str] | None = None) -> TCIJSONResponse:
    headers = {**(extra or {}), "x-should-retry": "true" if exc.retry else "false"}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    body = render_error(exc.status_code, exc.message, exc.type, exc.code, exc.param)
    return TCIJSONResponse(body, status_code=exc.status_code, headers=headers)


_LONE_SURROGATE = (
    " (a \\uD800-\\uDFFF escape must be one half of a surrogate pair: alone it is not a character,"
    " and no Python source can hold it; send valid Unicode text)"
)


def _from_validation(exc: RequestValidationError) -> OrchestratorError:
    errors: list[dict[str, Any]] = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('msg')}"
        if "surrogate" in message or "hex escape" in message:
            # The parser's words for "\ud800" alone, which e.g. Python's json.dumps writes for a str
            # decoded with surrogateescape: say what it is and what to send instead.
            message += _LONE_SURROGATE
        return InvalidRequest(message, code="invalid_json")
    if loc == ["language"] and first.get("type") != "missing":
        ctx = first.get("ctx")
        expected = ctx.get("expected", "'python'") if isinstance(ctx, dict) else "'python'"
        error = InvalidRequest(
            f"language {first.get('input')!r} is not supported; expected {expected}",
            param="language",
            code="unsupported_language",
        )
    else:
        where = f"{param}: " if param else ""
        error = InvalidRequest(f"{where}{first.get('msg')}", param=param)
    error.status_code = 422
    return error


def error_response(exc: Exception) -> TCIJSONResponse:
    """The response for ``exc``: our tree as it says, validation and routing errors as ours, anything else a 500."""
    if isinstance(exc, OrchestratorError):
        if exc.status_code >= 500:
            log.warning("request_failed", code=exc.code, error=exc.message)
        return _respond(exc)
    if isinstance(exc, RequestValidationError):
        return _respond(_from_validation(exc))
    if isinstance(exc, StarletteHTTPException):
        if isinstance(exc.__cause__, OrchestratorError):
            # FastAPI wraps any failure while reading the body (e.g. our 413) in a generic 400.
            return _respond(exc.__cause__)
        error = OrchestratorError(str(exc.detail), code="not_found" if exc.status_code == 404 else "http_error")
        error.status_code = exc.status_code
        error.type = "invalid_request_error"
        return _respond(error, exc.headers)  # a 405's Allow, say
    log.exception("unhandled_error", error=repr(exc))
    return _respond(OrchestratorError("internal error"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception FastAPI catches to ``error_response``."""

    async def handle(_: Request, exc: Exception) -> TCIJSONResponse:
        return error_response(exc)

    for kind in (OrchestratorError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
