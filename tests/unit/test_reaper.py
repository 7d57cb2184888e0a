"""The reaper's schedule speaks only when a run removed something or could not look."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import cast

import pytest
import structlog

from orchestrator.metrics import Metrics
from orchestrator.reaper import start_reaper
from orchestrator.sessions import ReapReport, SessionManager


class _Manager:
    def __init__(self, reports: list[ReapReport]) -> None:
        self.reports = reports
        self.runs = 0

    async def reap(self) -> ReapReport:
        self.runs += 1
        return self.reports[min(self.runs, len(self.reports)) - 1]


def test_runs_that_remove_nothing_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    manager = _Manager([ReapReport(), ReapReport(), ReapReport(removed=Counter(expired=2))])

    async def run() -> None:
        scheduler = start_reaper(cast("SessionManager", manager), Metrics(), interval=0.05)
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while manager.runs < 4:
                assert asyncio.get_running_loop().time() < deadline, "the reaper did not run four times"
                await asyncio.sleep(0.02)
        finally:
            scheduler.shutdown(wait=False)

    with caplog.at_level(logging.DEBUG), structlog.testing.capture_logs() as events:
        logging.getLogger("apscheduler").setLevel(logging.NOTSET)
        asyncio.run(run())
    noise = [r.getMessage() for r in caplog.records if r.name.startswith("apscheduler") and r.levelno >= logging.INFO]
    assert not noise
    assert [e["event"] for e in events] == ["reaped"] * (manager.runs - 2), events
