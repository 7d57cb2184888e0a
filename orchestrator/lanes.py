"""Run lanes: the sandboxes that serve ``/run_code``, each running one request at a time.

A tenant's lanes are ordinary sessions opened through ``SessionManager.open`` (admission, caps,
warm pool), held by handle and never listed or reachable by id. A request leases an idle lane,
or opens one while the tenant has fewer than ``run_code_sandboxes``, or waits in arrival order
for one to come back; past ``run_code_wait_seconds`` it gets ``Saturated`` (a 504). Between two
requests the runner's ``run`` op has killed every process of the first and removed what it wrote,
so a lane is reused rather than replaced: that is what makes short programs cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from .errors import CapacityExhausted, OrchestratorError, Saturated
from .sessions import Session, SessionManager
from .settings import Settings

log = structlog.get_logger(__name__)

# A lane this close to the end of its session's lifespan is retired rather than leased.
_EXPIRY_MARGIN = 120.0


@dataclass
class _Lanes:
    """One tenant's lanes."""

    idle: list[tuple[Session, float]] = field(default_factory=list)
    held: int = 0
    """Lanes leased out or being opened."""
    waiters: deque[asyncio.Future[Session | None]] = field(default_factory=deque)


class RunLanes:
    """Leases run lanes per tenant; the lifespan starts and closes it."""

    def __init__(
        self, manager: SessionManager, settings: Settings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._clock = clock
        self._tenants: dict[str, _Lanes] = {}
        self._trimmer: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Start removing lanes that stay idle."""
        self._trimmer = asyncio.create_task(self._trim_loop(), name="run-lanes-trim")

    async def close(self) -> None:
        """Remove every idle lane; leased ones are removed when they come back."""
        if self._trimmer is not None:
            self._trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimmer
        self._closed = True
        for lanes in self._tenants.values():
            while lanes.idle:
                await self._manager.end(lanes.idle.pop()[0])

    def counts(self) -> dict[str, int]:
        """Idle and leased lanes, and requests waiting for one, over all tenants."""
        return {
            "idle": sum(len(t.idle) for t in self._tenants.values()),
            "leased": sum(t.held for t in self._tenants.values()),
            "waiting": sum(len(t.waiters) for t in self._tenants.values()),
        }

    @contextlib.asynccontextmanager
    async def lease(self, tenant: str) -> AsyncIterator[Session]:
        """A lane of ``tenant`` for one request.

        Raises:
            Saturated: no lane became free in time (nothing ran).
            SandboxFailure: a new lane could not be started (nothing ran).
        """
        session = await self._acquire(tenant)
        try:
            yield session
        finally:
            await self._release(tenant, session)

    def _usable(self, session: Session) -> bool:
        return (
            not self._closed
            and session.gone is None
            and not session.client.closed
            and session.claim.expires_at - time.time() > _EXPIRY_MARGIN
        )

    async def _acquire(self, tenant: str) -> Session:
        lanes = self._tenants.setdefault(tenant, _Lanes())
        deadline = self._clock() + self._settings.run_code_wait_seconds
        while True:
            while lanes.idle:
                session, _ = lanes.idle.pop()
                if self._usable(session):
                    lanes.held += 1
                    return session
                await self._manager.end(session)
            if lanes.held < self._settings.run_code_sandboxes:
                lanes.held += 1
                try:
                    return await self._manager.open(tenant, listed=False)
                except CapacityExhausted as exc:
                    lanes.held -= 1
                    if lanes.held == 0:
                        # Nothing of ours will come back to wait for: the caps are taken by sessions.
                        raise Saturated(exc.message, retry_after=exc.retry_after) from exc
                except BaseException:
                    lanes.held -= 1
                    raise
            handed = await self._wait(lanes, deadline)
            if handed is not None:
                return handed

    async def _wait(self, lanes: _Lanes, deadline: float) -> Session | None:
        """A lane handed over by a release, or None to try again (one was retired)."""
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise Saturated(
                f"all {lanes.held} run_code sandboxes of this tenant stayed busy for "
                f"{self._settings.run_code_wait_seconds:g} s",
                retry_after=1,
            )
        future: asyncio.Future[Session | None] = asyncio.get_running_loop().create_future()
        lanes.waiters.append(future)
        try:
            await asyncio.wait({future}, timeout=remaining)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and (handed := future.result()) is not None:
                await self._release_to(lanes, handed)
            raise
        finally:
            if not future.done():
                future.cancel()
            with contextlib.suppress(ValueError):
                lanes.waiters.remove(future)
        if not future.done() or future.cancelled():
            return await self._wait(lanes, deadline)
        # A lane handed over is still counted in ``held``: it went from one lease to the next.
        return future.result()

    async def _release(self, tenant: str, session: Session) -> None:
        await self._release_to(self._tenants[tenant], session)

    async def _release_to(self, lanes: _Lanes, session: Session) -> None:
        if not self._usable(session):
            lanes.held -= 1
            with contextlib.suppress(OrchestratorError):
                await self._manager.end(session)
            # Its slot is free: the oldest waiter may open a lane in its place.
            self._hand(lanes, None)
        elif not self._hand(lanes, session):
            lanes.held -= 1
            lanes.idle.append((session, self._clock()))

    @staticmethod
    def _hand(lanes: _Lanes, session: Session | None) -> bool:
        """Give ``session`` (or a wake-up) to the oldest waiter; False when nobody waits."""
        while lanes.waiters:
            waiter = lanes.waiters.popleft()
            if not waiter.done():
                waiter.set_result(session)
                return True
        return False

    async def _trim_loop(self) -> None:
        idle_limit = self._settings.run_code_idle_seconds
        while True:
            await asyncio.sleep(min(idle_limit / 2, 15.0))
            now = self._clock()
            for lanes in self._tenants.values():
                stale = [entry for entry in lanes.idle if now - entry[1] >= idle_limit or not self._usable(entry[0])]
                lanes.idle = [entry for entry in lanes.idle if entry not in stale]
                for session, _ in stale:
                    with contextlib.suppress(OrchestratorError):
                        await self._manager.end(session)
                if stale:
                    log.info("run_lanes_trimmed", count=len(stale))
