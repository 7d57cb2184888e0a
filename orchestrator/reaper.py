"""The reaper's schedule. Its policy is ``SessionManager.reap``; this is the only APScheduler import."""

from __future__ import annotations

import logging

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .metrics import Metrics
from .sessions import SessionManager

log = structlog.get_logger(__name__)


async def reap_once(manager: SessionManager, metrics: Metrics) -> None:
    """One pass; errors are logged and counted, never raised into the scheduler."""
    try:
        report = await manager.reap()
    except Exception:
        metrics.reaper_runs.labels(result="error").inc()
        log.exception("reaper_failed")
        return
    metrics.reaper_runs.labels(result="skipped" if report.skipped else "ok").inc()
    # A run that removed nothing says nothing: one comes every interval.
    if report.skipped:
        log.warning("reaper_skipped", reason=report.skipped)
    if report.removed:
        log.info("reaped", removed=dict(report.removed))


def start_reaper(manager: SessionManager, metrics: Metrics, interval: float) -> AsyncIOScheduler:
    """Run ``reap_once`` every ``interval`` seconds on the running loop, one run at a time."""
    # APScheduler logs two INFO lines per run ("Running job", "executed successfully"); its
    # warnings (a missed or skipped run) still come through.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = AsyncIOScheduler()
    scheduler.add_job(
        reap_once,
        "interval",
        seconds=interval,
        args=[manager, metrics],
        id="reaper",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=max(1, int(interval)),
    )
    scheduler.start()
    return scheduler
