"""The warm pool: sandboxes whose kernel is already running, claimed by new sessions.

Pooled sandboxes are one-shot (a claim turns one into a session for good), count against the
global capacity, are named as unclaimed on the engine so a restarted orchestrator re-adopts
them, and are replaced when they age out or stop answering. When the pool is empty a new session
falls back to a cold start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable

import structlog

from .backends.base import Backend, ready_client
from .errors import OrchestratorError
from .metrics import Metrics
from .models import SandboxInfo
from .runner_client import RunnerClient, RunnerRefused
from .settings import Settings

log = structlog.get_logger(__name__)

_MAX_BACKOFF = 30.0


class WarmPool:
    """Keeps ``settings.pool_size`` ready sandboxes; ``take`` hands one out without waiting."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics, *, has_room: Callable[[], bool]) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self._has_room = has_room
        self._profile = settings.sandbox.profile_key()
        self._ready: deque[tuple[SandboxInfo, RunnerClient]] = deque()
        self._filling = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        """Target number of ready sandboxes (0: pool off)."""
        return self._settings.pool_size

    @property
    def ready_count(self) -> int:
        """Sandboxes ready to be claimed now."""
        return len(self._ready)

    @property
    def occupancy(self) -> int:
        """Capacity the pool holds: ready sandboxes plus those starting."""
        return len(self._ready) + self._filling

    def sandbox_ids(self) -> set[str]:
        """Sandboxes the pool owns (the reaper must not treat them as orphans)."""
        return {sandbox.sandbox_id for sandbox, _ in self._ready}

    async def start(self) -> None:
        """Start the background filler (no-op when the pool is off)."""
        if self.size > 0 and self._task is None:
            self._task = asyncio.create_task(self._fill_loop(), name="warm-pool")

    async def close(self) -> None:
        """Stop filling; the ready sandboxes stay on the engine for the next start to adopt."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._ready:
            _, client = self._ready.popleft()
            await client.close()
        self._update_gauge()

    def take(self) -> tuple[SandboxInfo, RunnerClient] | None:
        """A ready sandbox and its open runner channel, or None when the pool is empty."""
        while self._ready:
            sandbox, client = self._ready.popleft()
            self._wake.set()
            self._update_gauge()
            if not client.closed:
                self._metrics.pool_claims.labels(result="hit").inc()
                return sandbox, client
        self._metrics.pool_claims.labels(result="miss").inc()
        return None

    async def adopt(self, sandbox: SandboxInfo) -> bool:
        """Take over an unclaimed sandbox found at start-up; False means the caller removes it."""
        if (
            self.size == 0
            or not sandbox.running
            or not sandbox.pristine
            or sandbox.profile != self._profile
            or len(self._ready) >= self.size
        ):
            return False
        try:
            client = await ready_client(self._backend, sandbox, 10)
        except (OrchestratorError, RunnerRefused) as exc:
            log.warning("pool_adopt_failed", sandbox=sandbox.sandbox_id[:12], error=str(exc))
            return False
        self._ready.append((sandbox, client))
        self._update_gauge()
        return True

    async def prune(self, sandboxes: list[SandboxInfo], now: float) -> Counter[str]:
        """Drop ready sandboxes that aged out, died or vanished. Called by the reaper."""
        alive = {s.sandbox_id for s in sandboxes if s.running}
        removed: Counter[str] = Counter()
        keep: deque[tuple[SandboxInfo, RunnerClient]] = deque()
        while self._ready:
            sandbox, client = self._ready.popleft()
            too_old = now - sandbox.created_at >= self._settings.pool_max_age_seconds
            if sandbox.sandbox_id in alive and not client.closed and not too_old:
                keep.append((sandbox, client))
                continue
            await client.close()
            with contextlib.suppress(OrchestratorError):
                await self._backend.destroy(sandbox.sandbox_id)
            removed["pool_aged" if too_old else "pool_unhealthy"] += 1
        self._ready = keep
        if removed:
            self._wake.set()
        self._update_gauge()
        return removed

    def _update_gauge(self) -> None:
        self._metrics.pool_ready.set(len(self._ready))

    async def _fill_loop(self) -> None:
        backoff = 0.5
        while True:
            while len(self._ready) + self._filling < self.size and self._has_room():
                if await self._fill_one():
                    backoff = 0.5
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5)

    async def _fill_one(self) -> bool:
        self._filling += 1
        began = time.monotonic()
        sandbox: SandboxInfo | None = None
        try:
            # Cancelled (a shutdown mid-fill): the backend removes a sandbox it had not started yet;
            # a started one stays for the next start to adopt or reap.
            sandbox = await self._backend.create(None)
            client = await ready_client(self._backend, sandbox, self._settings.runner_ready_timeout_seconds)
        except (OrchestratorError, RunnerRefused) as exc:
            log.warning("pool_fill_failed", error=str(exc))
            if sandbox is not None:
                with contextlib.suppress(OrchestratorError):
                    await self._backend.destroy(sandbox.sandbox_id)
            return False
        finally:
            self._filling -= 1
        self._ready.append((sandbox, client))
        self._metrics.pool_fill_seconds.observe(time.monotonic() - began)
        self._update_gauge()
        return True
