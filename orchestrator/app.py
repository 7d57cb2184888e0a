"""The app factory. Its lifespan owns every long-lived resource, opened and closed in order."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__
from .api import files, health, playground, sandbox_fusion, tci
from .api.deps import Services
from .api.errors import install_error_handlers
from .api.mcp import PATH as mcp_path
from .api.mcp import McpEndpoint
from .api.middleware import edge_middleware, normalize_path
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


class App(FastAPI):
    """FastAPI, with a few ``POST`` routes served straight from here (``direct``).

    For the hottest route, the layers FastAPI and Starlette wrap around every request (telemetry,
    error and exception middleware, the exit stack, routing) were the largest share of the
    orchestrator's Python work per execute in a profile. A direct route brings the app's own edge
    middleware with it and renders errors with the one handler; FastAPI still describes it (OpenAPI)
    and answers its other methods.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direct: dict[str, ASGIApp] = {}
        self.stopping: Callable[[], Awaitable[None]] | None = None
        """Set while the lifespan runs: what the server calls before it waits for open requests."""

    def direct(self, path: str, app: ASGIApp) -> None:
        """Serve ``POST path`` (after slash normalisation) with ``app``, ahead of FastAPI."""
        self._direct[path] = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = self._direct.get(normalize_path(scope["path"]))
            if target is not None:
                await target(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, backend: Backend | None = None) -> App:
    """Build the app; nothing starts until the lifespan runs (uvicorn, or a TestClient entered)."""
    chosen = backend or make_backend(settings)
    mcp = McpEndpoint()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
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
            assert isinstance(app, App)
            app.stopping = manager.stop_executes
            try:
                async with mcp.running(services):
                    yield {"services": services}
            finally:
                app.stopping = None
                scheduler.shutdown(wait=False)
        finally:
            await lanes.close()
            await manager.shutdown()
            await chosen.close()

    edge = edge_middleware(settings.max_body_bytes)
    app = App(
        title="TCI-compatible code interpreter",
        version=__version__,
        summary="Self-hosted Together Code Interpreter: one hardened container per session.",
        lifespan=lifespan,
        middleware=edge,
    )
    app.state.mcp = mcp
    install_error_handlers(app)
    execute: ASGIApp = tci.serve_execute
    for middleware in reversed(edge):
        cls, args, kwargs = middleware
        execute = cls(execute, *args, **kwargs)
    for prefix in ("", "/v1"):
        app.include_router(tci.router, prefix=prefix)
        app.include_router(files.router, prefix=prefix)
        app.direct(f"{prefix}/tci/execute", execute)
    app.include_router(sandbox_fusion.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    for prefix in ("", "/v1"):
        # POST only: a stateless server pushes nothing (a GET's event stream stayed open, silent, until
        # the server stopped) and keeps no session to DELETE; 405 is what MCP says to answer both.
        app.router.routes.append(Route(f"{prefix}{mcp_path}", mcp, methods=["POST"], include_in_schema=False))
    return app
