"""``python -m orchestrator``: serve the API with uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Final

import structlog
import uvicorn
from sse_starlette.sse import AppStatus

from .app import App, create_app
from .logging import configure_logging
from .settings import Settings

log = structlog.get_logger(__name__)
# Longest the server waits for its sessions' runners to take the interrupts before it stops anyway.
_STOPPING_SECONDS: Final = 3.0


def main(argv: list[str] | None = None) -> None:
    """Parse flags (which override ``ORCH_HOST``/``ORCH_PORT``), then serve."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    parser.add_argument("--host", help="bind address (default: ORCH_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: ORCH_PORT or 8000)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    # sse-starlette ends every open stream as soon as the server is told to stop, before the executes
    # behind them can answer (``_Server`` interrupts them first): those streams end with their result.
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        # Room for interrupted executes to answer (code that ignores SIGINT is cut off at the end).
        timeout_graceful_shutdown=5,
    )
    _Server(config, app).run()


class _Server(uvicorn.Server):
    """uvicorn's server, which lets the app stop its running executes before waiting for open requests."""

    def __init__(self, config: uvicorn.Config, app: App) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopping = self._app.stopping
        if stopping is not None:
            try:
                async with asyncio.timeout(_STOPPING_SECONDS):
                    await stopping()
            except Exception:  # the server stops all the same
                log.exception("stopping_executes_failed")
        await super().shutdown(sockets)


if __name__ == "__main__":
    main()
