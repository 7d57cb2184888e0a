"""``python -m orchestrator``: serve the API with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from .app import create_app
from .logging import configure_logging
from .settings import Settings


def main(argv: list[str] | None = None) -> None:
    """Parse flags (which override ``ORCH_HOST``/``ORCH_PORT``), then serve."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    parser.add_argument("--host", help="bind address (default: ORCH_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: ORCH_PORT or 8000)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_format, settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
