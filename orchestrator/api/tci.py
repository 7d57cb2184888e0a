"""The TCI routes: exactly what the together SDKs call, plus a session ``DELETE`` extension."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response

from ..schemas import (
    ErrorEnvelope,
    ExecuteRequest,
    ExecuteResponse,
    SessionListResponse,
    render_execute,
    render_sessions,
)
from .deps import ServicesDep, TenantDep
from .responses import TCIJSONResponse

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 404, 413, 422, 429, 500, 502, 503)
}
router = APIRouter(tags=["code interpreter"], default_response_class=TCIJSONResponse)

# Keep clear of the client's own read timeout, or the 2.x SDK gives up and sends the code again.
_CLIENT_TIMEOUT_MARGIN = 5.0


def _timeout(configured: float, client_read_timeout: str | None) -> float:
    try:
        client = float(client_read_timeout) if client_read_timeout else None
    except ValueError:
        client = None
    if client is not None and client - _CLIENT_TIMEOUT_MARGIN >= 1:
        return min(configured, client - _CLIENT_TIMEOUT_MARGIN)
    return configured


@router.post("/tci/execute", responses={200: {"model": ExecuteResponse}, **_ERRORS})
async def execute(
    body: ExecuteRequest,
    tenant: TenantDep,
    services: ServicesDep,
    x_stainless_read_timeout: Annotated[str | None, Header()] = None,
) -> TCIJSONResponse:
    """Run code in a session (a new one when ``session_id`` is omitted)."""
    files = [file.model_dump() for file in body.files] if body.files else None
    timeout = _timeout(services.settings.execute_timeout_seconds, x_stainless_read_timeout)
    result = await services.manager.execute(tenant, body.session_id, body.code, files, timeout)
    return TCIJSONResponse(render_execute(result))


@router.get("/tci/sessions", responses={200: {"model": SessionListResponse}, **_ERRORS})
async def list_sessions(tenant: TenantDep, services: ServicesDep) -> TCIJSONResponse:
    """The caller's live sessions."""
    return TCIJSONResponse(render_sessions(services.manager.sessions_of(tenant)))


@router.delete("/tci/sessions/{session_id}", status_code=204, responses=_ERRORS)
async def close_session(session_id: str, tenant: TenantDep, services: ServicesDep) -> Response:
    """Extension: end a session now and remove its sandbox."""
    await services.manager.close(tenant, session_id)
    return Response(status_code=204)
