"""The reaper's schedule. Its policy is ``SessionManager.reap``; this is the only APScheduler import."""

from __future__ import annotations

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
    if report.removed or report.skipped:
        log.info("reaped", removed=dict(report.removed), skipped=report.skipped)


def start_reaper(manager: SessionManager, metrics: Metrics, interval: float) -> AsyncIOScheduler:
    """Run ``reap_once`` every ``interval`` seconds on the running loop, one run at a time."""
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
