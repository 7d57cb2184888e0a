"""The app factory. Its lifespan owns every long-lived resource, opened and closed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from . import __version__
from .api import health, tci
from .api.deps import Services
from .api.errors import install_error_handlers
from .api.middleware import BodyLimitMiddleware, NormalizePathMiddleware, RequestContextMiddleware
from .backends.base import Backend
from .metrics import Metrics
from .reaper import start_reaper
from .sessions import SessionManager
from .settings import Settings
from .tenancy import Authenticator


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

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        metrics = Metrics()
        await chosen.start()
        manager = SessionManager(settings, chosen, metrics)
        try:
            await manager.start()
            scheduler = start_reaper(manager, metrics, settings.reaper_interval_seconds)
            try:
                yield {
                    "services": Services(
                        settings=settings,
                        backend=chosen,
                        manager=manager,
                        authenticator=Authenticator(settings),
                        metrics=metrics,
                    )
                }
            finally:
                scheduler.shutdown(wait=False)
        finally:
            await manager.shutdown()
            await chosen.close()

    app = FastAPI(
        title="TCI-compatible code interpreter",
        version=__version__,
        summary="Self-hosted Together Code Interpreter: one hardened container per session.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(tci.router)
    app.include_router(tci.router, prefix="/v1")
    app.include_router(health.router)
    # Added last = outermost: paths are normalised before routing, bodies capped before parsing.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(NormalizePathMiddleware)
    return app
