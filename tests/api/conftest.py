"""Fixtures for the in-process API tests: the real app with the local backend (real kernels)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_support import KEY_A, App, running_app


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    """One app per module (kernels take about a second to start)."""
    with running_app() as running:
        yield running


@pytest.fixture(scope="module")
def victim(app: App) -> str:
    """An existing session of tenant A, holding ``counter = 0``: bad requests must not touch it."""
    data = app.execute(KEY_A, "import os\ncounter = 0")
    return str(data["session_id"])
