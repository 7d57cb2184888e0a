"""Pure ASGI middleware: path normalisation, the body size limit, and request-scoped log context."""

from __future__ import annotations

import re
import secrets
import time

import structlog
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import RequestTooLarge

log = structlog.get_logger("orchestrator.access")
_SLASHES = re.compile(r"/{2,}")
# nginx's status for a request whose client closed the connection before it was answered.
_CLIENT_CLOSED = 499


def normalize_path(path: str) -> str:
    """``path`` with repeated slashes collapsed."""
    return _SLASHES.sub("/", path) if "//" in path else path


def edge_middleware(max_body_bytes: int) -> list[Middleware]:
    """What every request passes through before its route, outermost first: paths are normalised before
    routing, bodies capped before parsing, and every request is logged."""
    return [
        Middleware(NormalizePathMiddleware),
        Middleware(RequestContextMiddleware),
        Middleware(BodyLimitMiddleware, max_bytes=max_body_bytes),
    ]


class NormalizePathMiddleware:
    """Collapse repeated slashes: the 1.x SDK posts to ``/v1//tci/execute``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            path = normalize_path(scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413, whether announced by Content-Length or streamed.

    Starlette has no limit of its own, so without this a client could make us buffer anything.
    The error is raised from ``receive`` so the app's single error handler renders it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:

                async def refuse() -> Message:
                    raise self._too_large()

                await self.app(scope, refuse, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> RequestTooLarge:
        # Made when needed: one built for every request was a few percent of an execute's CPU here.
        return RequestTooLarge(f"request body is larger than the {self.max_bytes}-byte limit")


class RequestContextMiddleware:
    """Bind a request id to every log line of the request, and log one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        status = 0  # no response started yet
        began = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_status)
            except BaseException:
                status = status or 500  # answered further out, by the server's own error handling
                raise
            finally:
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    # Nothing raised and nothing sent: the client left before there was anything to answer.
                    status=status or _CLIENT_CLOSED,
                    ms=round((time.perf_counter() - began) * 1000, 2),
                )
