"""JSON log lines: every value renders, our events and the standard library's alike, one line each."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from orchestrator.logging import configure_logging


@pytest.fixture
def json_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Logging configured for JSON onto a file standing in for stderr; the file's path."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    path = tmp_path / "stderr"
    with path.open("w", encoding="utf-8") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        configure_logging("json", "info")
        try:
            yield path
        finally:
            structlog.reset_defaults()
            root.handlers[:] = handlers
            root.setLevel(level)


def test_json_lines_hold_any_value(json_log: Path) -> None:
    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    log = structlog.get_logger("orchestrator.test")
    with structlog.contextvars.bound_contextvars(request_id="r1"):
        log.info("first", path="/tmp/caf\u00e9", thing=Opaque(), ratio=float("nan"))
        log.info("second", path="/tmp/\udcff")  # a lone surrogate, as a sandbox's file name may hold
    log.debug("below the level")
    # A logger of its own: a server run earlier in the same process may have configured uvicorn's.
    logging.getLogger("tci.test.stdlib").warning("from %s", "the standard library")

    lines = json_log.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3, lines
    first, second, foreign = (json.loads(line) for line in lines)
    assert first.pop("timestamp").endswith("Z")
    # NaN is not JSON: null, as in API responses.
    assert first == {
        "event": "first",
        "level": "info",
        "request_id": "r1",
        "path": "/tmp/caf\u00e9",
        "thing": "<opaque>",
        "ratio": None,
    }
    assert second["path"] == "/tmp/?"
    assert (foreign["event"], foreign["level"]) == ("from the standard library", "warning")
