"""Fixtures shared by every suite. Keep this small: suite-specific fixtures live next to their tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
Waiter = Callable[..., Any]


def _wait_until(predicate: Callable[[], T], *, timeout: float, message: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_until() -> Waiter:
    """``wait_until(predicate, timeout=..., message=...)``: poll with a deadline instead of sleeping."""
    return _wait_until
