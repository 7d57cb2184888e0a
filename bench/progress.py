"""Progress lines while the benchmark runs (stdout, flushed, with the time since start)."""

from __future__ import annotations

import sys
import time

_STARTED = time.monotonic()


def say(message: str) -> None:
    """Print one progress line."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stdout, flush=True)


def elapsed() -> float:
    """Seconds since the benchmark started."""
    return time.monotonic() - _STARTED
