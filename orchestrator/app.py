"""The app factory. Its lifespan owns every long-lived resource, opened and closed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route

from . import __version__
from .api import files, health, playground, sandbox_fusion, tci
from .api.deps import Services
from .api.errors import install_error_handlers
from .api.mcp import PATH as mcp_path
from .api.mcp import McpEndpoint
from .api.middleware import BodyLimitMiddleware, NormalizePathMiddleware, RequestContextMiddleware
from .backends.base import Backend
from .lanes import RunLanes
from .metrics import Metrics
from .reaper import start_reaper
from .sessions import SessionManager
from .settings import Settings
from .tenancy import Authenticator
from .workspace import SessionFiles


def make_backend(settings: Settings) -> Backend:
    """The configured backend."""
    if settings.backend == "local":
        from .backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.backend == "kubernetes":
        from .backends.kubernetes import KubernetesBackend

        return KubernetesBackend(settings)
    from .backends.docker import DockerBackend

    return DockerBackend(settings)


def create_app(settings: Settings, *, backend: Backend | None = None) -> FastAPI:
    """Build the app; nothing starts until the lifespan runs (uvicorn, or a TestClient entered)."""
    chosen = backend or make_backend(settings)
    mcp = McpEndpoint()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        metrics = Metrics()
        await chosen.start()
        manager = SessionManager(settings, chosen, metrics)
        lanes = RunLanes(manager, settings)
        try:
            await manager.start()
            await lanes.start()
            scheduler = start_reaper(manager, metrics, settings.reaper_interval_seconds)
            services = Services(
                settings=settings,
                backend=chosen,
                manager=manager,
                authenticator=Authenticator(settings),
                metrics=metrics,
                lanes=lanes,
                files=SessionFiles(manager, settings.max_download_bytes),
            )
            try:
                async with mcp.running(services):
                    yield {"services": services}
            finally:
                scheduler.shutdown(wait=False)
        finally:
            await lanes.close()
            await manager.shutdown()
            await chosen.close()

    app = FastAPI(
        title="TCI-compatible code interpreter",
        version=__version__,
        summary="Self-hosted Together Code Interpreter: one hardened container per session.",
        lifespan=lifespan,
    )
    app.state.mcp = mcp
    install_error_handlers(app)
    for prefix in ("", "/v1"):
        app.include_router(tci.router, prefix=prefix)
        app.include_router(files.router, prefix=prefix)
    app.include_router(sandbox_fusion.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    app.router.routes.append(Route(mcp_path, mcp, methods=["GET", "POST", "DELETE"], include_in_schema=False))
    # Added last = outermost: paths are normalised before routing, bodies capped before parsing.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(NormalizePathMiddleware)
    return app
