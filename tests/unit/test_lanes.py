"""Run lanes on a fake session layer: leasing, hand-over in arrival order, 504s, retiring broken lanes."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest

from orchestrator.errors import CapacityExhausted, Saturated
from orchestrator.lanes import RunLanes
from orchestrator.models import Claim, SandboxInfo
from orchestrator.sessions import Session, SessionManager
from orchestrator.settings import Settings

pytestmark = pytest.mark.anyio


async def until(predicate: Any, what: str, timeout: float = 5.0) -> None:
    """Yield to the other tasks until ``predicate()`` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Client:
    closed = False


class FakeManager:
    """``open`` and ``end`` as the lanes use them; ``full`` makes ``open`` hit the session cap."""

    def __init__(self) -> None:
        self.opened: list[Session] = []
        self.ended: list[Session] = []
        self.full = False

    async def open(self, tenant: str, *, listed: bool = True) -> Session:
        if self.full:
            raise CapacityExhausted("tenant session cap reached", retry_after=5)
        now = time.time()
        index = len(self.opened)
        claim = Claim(f"ses_fake{index:08d}", tenant, now, now + 3600, listed)
        sandbox = SandboxInfo(f"sandbox{index}", "name", True, now, "profile", claim)
        session = Session(claim=claim, sandbox=sandbox, client=cast(Any, _Client()))
        self.opened.append(session)
        return session

    async def end(self, session: Session) -> None:
        session.gone = session.gone or "closed"
        self.ended.append(session)


def lanes_with(manager: FakeManager, **settings: Any) -> RunLanes:
    values = {"run_code_sandboxes": 1, "run_code_wait_seconds": 5, **settings}
    return RunLanes(cast(SessionManager, manager), Settings(backend="local", **values))


async def test_a_lane_is_reused_and_never_listed() -> None:
    manager = FakeManager()
    lanes = lanes_with(manager)
    async with lanes.lease("t") as first:
        assert first.claim.listed is False
    async with lanes.lease("t") as second:
        assert second is first
    assert len(manager.opened) == 1
    assert lanes.counts() == {"idle": 1, "leased": 0, "waiting": 0}


async def test_waiters_get_the_lane_in_arrival_order_and_time_out_with_504() -> None:
    manager = FakeManager()
    lanes = lanes_with(manager, run_code_wait_seconds=0.5)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with lanes.lease("t"):
            await release.wait()

    async def waiter(name: str) -> None:
        async with lanes.lease("t") as session:
            order.append(f"{name}:{session.sandbox.sandbox_id}")

    held = asyncio.create_task(holder())
    await until(lambda: lanes.counts()["leased"] == 1, "the holder's lease")
    waiting = [asyncio.create_task(waiter(name)) for name in ("a", "b")]
    await until(lambda: lanes.counts()["waiting"] == 2, "both waiters to queue")
    release.set()
    await asyncio.gather(held, *waiting)
    assert order == ["a:sandbox0", "b:sandbox0"]
    # Held past the wait limit: the next caller gets a 504 with Retry-After, nothing opened.
    release.clear()
    held = asyncio.create_task(holder())
    await until(lambda: lanes.counts()["leased"] == 1, "the holder's lease")
    with pytest.raises(Saturated) as caught:
        async with lanes.lease("t"):
            pass
    assert caught.value.status_code == 504
    assert caught.value.retry_after == 1
    release.set()
    await held
    assert len(manager.opened) == 1


async def test_tenants_never_share_a_lane_and_the_session_cap_answers_504() -> None:
    manager = FakeManager()
    lanes = lanes_with(manager)
    async with lanes.lease("t1") as one, lanes.lease("t2") as two:
        assert one is not two
        assert (one.claim.tenant, two.claim.tenant) == ("t1", "t2")
    manager.full = True
    with pytest.raises(Saturated, match="session cap"):
        async with lanes.lease("t3"):
            pass


async def test_a_broken_lane_is_ended_and_its_waiter_opens_a_new_one() -> None:
    manager = FakeManager()
    lanes = lanes_with(manager)
    got: list[Session] = []
    broken = asyncio.Event()

    async def breaker() -> None:
        async with lanes.lease("t") as session:
            await broken.wait()
            session.client.closed = True  # type: ignore[misc]

    async def waiter() -> None:
        async with lanes.lease("t") as session:
            got.append(session)

    first = asyncio.create_task(breaker())
    await until(lambda: lanes.counts()["leased"] == 1, "the breaker's lease")
    second = asyncio.create_task(waiter())
    await until(lambda: lanes.counts()["waiting"] == 1, "the waiter to queue")
    broken.set()
    await asyncio.gather(first, second)
    assert manager.ended == [manager.opened[0]]
    assert got == [manager.opened[1]]


async def test_close_ends_idle_lanes() -> None:
    manager = FakeManager()
    lanes = lanes_with(manager)
    await lanes.start()
    async with lanes.lease("t"):
        pass
    await lanes.close()
    assert manager.ended == manager.opened
    assert lanes.counts() == {"idle": 0, "leased": 0, "waiting": 0}
