"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import OrchestratorError
from .deps import ServicesDep
from .responses import TCIJSONResponse

router = APIRouter(tags=["operations"], default_response_class=TCIJSONResponse)


@router.get("/healthz")
async def healthz() -> TCIJSONResponse:
    """The process is up."""
    return TCIJSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(services: ServicesDep) -> TCIJSONResponse:
    """The engine answers, the sandbox image is present and the server is not stopping (503 otherwise)."""
    checks: dict[str, object] = {}
    if services.manager.stopping:
        checks["server"] = "stopping"  # load balancers send new work elsewhere while executes finish
    try:
        await services.backend.ping()
        checks["engine"] = "ok"
        checks["image"] = "ok" if await services.backend.image_present() else "missing: run `make image`"
    except OrchestratorError as exc:
        checks["engine"] = f"unreachable: {exc.message}"
    pool = services.manager.pool
    checks["pool"] = {"ready": pool.ready_count, "target": pool.size}
    ready = checks.get("engine") == "ok" and checks.get("image") == "ok" and "server" not in checks
    return TCIJSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics")
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
