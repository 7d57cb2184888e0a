"""The TCI routes: exactly what the together SDKs call, plus session ``DELETE`` and ``interrupt`` extensions.

``POST /tci/execute`` also streams (``stream.py``) when the client accepts ``text/event-stream``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..interrupts import interrupt
from ..models import ExecuteResult, ExecuteWatcher
from ..schemas import (
    ErrorEnvelope,
    ExecuteRequest,
    ExecuteResponse,
    InterruptResponse,
    SessionListResponse,
    render_execute,
    render_sessions,
)
from ..settings import Settings
from .deps import ServicesDep, TenantDep, get_services, get_tenant
from .errors import error_response
from .responses import TCIJSONResponse
from .stream import MEDIA_TYPE, stream_execute, wants_stream

log = structlog.get_logger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 404, 413, 422, 429, 500, 502, 503)
}
router = APIRouter(tags=["code interpreter"], default_response_class=TCIJSONResponse)

# Keep clear of the client's own read timeout, or the 2.x SDK gives up and sends the code again:
# room for the runner's interrupt grace and a kernel restart, or half of a read timeout too short
# for that (the answer of code that stops at SIGINT follows at once).
_CLIENT_TIMEOUT_MARGIN = 5.0
# A read timeout this long (or infinite, or nonsense) sets no deadline.
_MAX_CLIENT_TIMEOUT = 365 * 24 * 3600.0


_SSE_EXAMPLE = (
    'event: output\ndata: {"type":"stdout","data":"step 1\\n"}\n\n'
    ": keep-alive\n\n"
    'event: output\ndata: {"type":"stdout","data":"step 2\\n"}\n\n'
    'event: result\ndata: {"data":{"session_id":"ses_…","status":"success","outputs":[{"type":"stdout",'
    '"data":"step 1\\nstep 2\\n"}],"errors":null,"outcome":"ok","state_lost":false},"errors":null}\n\n'
)
_EXECUTE_200: dict[str, Any] = {
    "model": ExecuteResponse,
    "description": "The execute's result; with `Accept: text/event-stream`, server-sent events ending in it.",
    "content": {MEDIA_TYPE: {"schema": {"type": "string"}, "example": _SSE_EXAMPLE}},
}


class ExecuteRoute(APIRoute):
    """``POST /tci/execute`` as FastAPI describes it; the requests themselves go to ``serve_execute``.

    The app hands them over before FastAPI's per-request layers (``app.py``); one that reaches the
    route all the same is served by the same function.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "POST":
            await serve_execute(scope, receive, send)
        else:
            await super().handle(scope, receive, send)  # FastAPI's 405, with its Allow header


async def serve_execute(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /tci/execute`` as a plain ASGI app, errors rendered by the one handler.

    The request is taken apart by hand, in the order that matters (the key before the body), without
    FastAPI's parameter resolution and the exit stacks it wraps around every route.
    """
    request = Request(scope, receive)
    try:
        response = await _execute_request(request)
    except ClientDisconnect:
        return  # gone while sending the body: nothing ran, and no one to answer
    except Exception as exc:  # noqa: BLE001 - every error is rendered, as FastAPI's handlers would
        response = error_response(exc)
    try:
        await response(scope, receive, send)
    except Exception as exc:
        # Too late for an error response (a stream has begun): logged with the request's id, then the
        # server ends the connection.
        log.exception("unhandled_error", error=repr(exc))
        raise


async def _execute_request(request: Request) -> Response:
    services = await get_services(request)
    tenant = await get_tenant(services, request.headers.get("authorization"))
    try:
        body = ExecuteRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    headers = request.headers
    return await execute(
        body, tenant, services, request, headers.get("x-stainless-read-timeout"), headers.get("accept")
    )


def _limits(settings: Settings, requested: float | None, client_read_timeout: str | None) -> tuple[float, float | None]:
    """The execute's own time limit, and when (``time.monotonic``) the client stops waiting, if it says."""
    configured = settings.execute_timeout_seconds
    if requested is not None:
        configured = min(requested, max(settings.max_execute_timeout_seconds, configured))
    try:
        client = float(client_read_timeout) if client_read_timeout else None
    except ValueError:
        client = None
    if client is None or not 0 < client < _MAX_CLIENT_TIMEOUT:
        return configured, None
    # Queueing behind the session's other executes and starting its sandbox come off this too.
    margin = _CLIENT_TIMEOUT_MARGIN if client - _CLIENT_TIMEOUT_MARGIN >= 1 else client / 2
    return configured, time.monotonic() + client - margin


async def execute(
    body: ExecuteRequest,
    tenant: TenantDep,
    services: ServicesDep,
    request: Request,
    x_stainless_read_timeout: Annotated[str | None, Header()] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Run code in a session (a new one when ``session_id`` is omitted).

    Extensions: `timeout` in the body (seconds, capped by the server's maximum), and streaming:
    with `Accept: text/event-stream` the answer is `event: output` per output item as it is
    produced, `: keep-alive` comments on a silent cell, then `event: result` holding the body
    below. Errors before the code starts stay plain JSON; a client that disconnects mid-stream
    interrupts the execute (the session is kept).
    """
    files = [file.model_dump() for file in body.files] if body.files else None
    timeout, deadline = _limits(services.settings, body.timeout, x_stainless_read_timeout)
    manager = services.manager

    async def run(watcher: ExecuteWatcher | None) -> ExecuteResult:
        return await manager.execute(
            tenant, body.session_id, body.code, files, timeout, watcher, deadline=deadline, gone=request.is_disconnected
        )

    if wants_stream(accept):

        async def stop(session_id: str) -> bool:
            return await interrupt(manager, tenant, session_id)

        return await stream_execute(run, stop, services.settings.stream_keepalive_seconds)
    return TCIJSONResponse(render_execute(await run(None)))


router.add_api_route(
    "/tci/execute",
    execute,
    methods=["POST"],
    route_class_override=ExecuteRoute,
    responses={200: _EXECUTE_200, **ERRORS},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "examples": {
                        "new session": {"value": {"language": "python", "code": "print('hello')"}},
                        "own time limit (extension)": {
                            "value": {"language": "python", "code": "import time; time.sleep(45)", "timeout": 60}
                        },
                    }
                }
            }
        }
    },
)


@router.get("/tci/sessions", responses={200: {"model": SessionListResponse}, **ERRORS})
async def list_sessions(tenant: TenantDep, services: ServicesDep) -> TCIJSONResponse:
    """The caller's live sessions."""
    return TCIJSONResponse(render_sessions(services.manager.sessions_of(tenant)))


@router.delete("/tci/sessions/{session_id}", status_code=204, responses=ERRORS)
async def close_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    """Extension: end a session now and remove its sandbox."""
    await services.manager.close(tenant, session_id)
    return Response(status_code=204)


@router.post("/tci/sessions/{session_id}/interrupt", responses={200: {"model": InterruptResponse}, **ERRORS})
async def interrupt_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> TCIJSONResponse:
    """Extension: interrupt the session's running execute, which then answers `outcome: "interrupted"`
    with its output so far; the session keeps its state. `interrupted: false` when nothing was running.
    """
    interrupted = await interrupt(services.manager, tenant, session_id)
    return TCIJSONResponse({"data": {"session_id": session_id, "interrupted": interrupted}, "errors": None})
