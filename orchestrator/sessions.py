"""Sessions: admission, provisioning, one-at-a-time executes, listing, reconcile and reaping.

The engine is the source of truth (``backends/labels.py``); the index here is a cache of it,
rebuilt by ``reconcile`` at start-up and corrected by every reaper run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog
from pydantic import BaseModel, Field, ValidationError, model_validator

from .attempts import Attempts, Request
from .backends.base import Backend, first_request, ready_client
from .errors import (
    CallerGone,
    CapacityExhausted,
    OrchestratorError,
    RunnerFailure,
    SandboxStartFailed,
    SandboxTaken,
    SessionNotFound,
)
from .metrics import Metrics
from .models import (
    Claim,
    ExecuteResult,
    ExecuteWatcher,
    SandboxInfo,
    SessionView,
    looks_like_session_id,
    new_session_id,
)
from .pool import WarmPool
from .runner_client import RunnerClient, RunnerRefused
from .settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Added to the execute timeout for the runner's interrupt grace, a kernel restart and the trip.
_REPLY_SLACK = 20.0
# An execute that waited longer than this asks whether its caller is still there before it starts.
_WAITED = 0.02
# With less than this left before the caller's deadline when its turn comes, nothing runs.
_MIN_RUN = 0.1
# How long, and how often, a stopping server interrupts what its sessions still run.
_STOP_SECONDS = 2.0
_STOP_INTERVAL = 0.2
_STOPPED = "[the server was stopped while this code ran, so it was interrupted; the session and its state are kept]\n"
_OUTPUT_TYPES = Literal["stdout", "stderr", "error", "display_data", "execute_result"]


class _RunnerOutput(BaseModel):
    type: _OUTPUT_TYPES
    data: str | dict[str, Any]

    @model_validator(mode="after")
    def _data_matches_type(self) -> _RunnerOutput:
        # The SDKs' strict mode rejects a string bundle and a dict stream: so must we.
        if isinstance(self.data, dict) != (self.type in {"display_data", "execute_result"}):
            raise ValueError(f"{self.type} output has the wrong kind of data")
        return self


class _Streamed:
    """The outputs a streaming execute has passed on, for a result that has no other record of them
    (its sandbox went away). Consecutive pieces of a stream are kept as one item, as a result has
    them, so that memory follows the bytes (bounded by the output caps), not the number of flushes."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Any]] = []

    def add(self, output: dict[str, Any]) -> None:
        kind, data = output["type"], output["data"]
        if kind in {"stdout", "stderr"} and self._items and self._items[-1][0] == kind:
            self._items[-1][1].append(data)
        else:
            self._items.append((kind, [data] if kind in {"stdout", "stderr"} else data))

    def outputs(self) -> list[dict[str, Any]]:
        return [{"type": kind, "data": "".join(data) if isinstance(data, list) else data} for kind, data in self._items]


def _relay(watcher: ExecuteWatcher, session_id: str, sent: _Streamed, frame: dict[str, Any]) -> None:
    """Pass one progress frame on to ``watcher``, and keep it in ``sent``; an invalid output is left out
    (the result has it right)."""
    event = frame.get("progress")
    if event == "started":
        watcher.started(session_id)
    elif event == "output":
        try:
            item = _RunnerOutput.model_validate(frame.get("output"))
        except ValidationError:
            return
        output = item.model_dump()
        sent.add(output)
        watcher.output(output)


@dataclass(frozen=True)
class _Job:
    """One execute as the runner is asked for it.

    ``deadline`` (monotonic) is when the caller stops waiting for the answer, ``gone`` whether it has
    already stopped: time spent queued behind the session's other executes or starting its sandbox
    comes off the run's own time, and code whose caller has left is not started (its SDK retries,
    and the retry would run it a second time).
    """

    code: str
    files: list[dict[str, str]] | None
    timeout: float
    watcher: ExecuteWatcher | None
    deadline: float | None = None
    gone: Callable[[], Awaitable[bool]] | None = None
    arrived: float = field(default_factory=time.monotonic)

    async def budget(self) -> float:
        """The run's time limit now that its turn has come.

        Raises:
            CallerGone: the caller left while the execute waited (nothing ran).
            CapacityExhausted: too little of the caller's time is left to run anything (nothing ran).
        """
        now = time.monotonic()
        if self.gone is not None and now - self.arrived > _WAITED and await self.gone():
            raise CallerGone("the client closed the connection before its code started; nothing ran")
        if self.deadline is None:
            return self.timeout
        left = self.deadline - now
        if left < _MIN_RUN:
            raise CapacityExhausted(
                "the session was busy until the client's read timeout had almost passed; nothing ran"
            )
        # In tenths: the limit is quoted back in a timeout's message.
        return min(self.timeout, round(left, 1))

    def request(self) -> Request:
        return Request(self.code, self.files, self.timeout)

    def watched(self) -> Callable[[], Awaitable[bool]] | None:
        """How to tell that the caller left, for ``attempts``; a stream's caller is told of each
        output, so it is never answered with another attempt's result."""
        return self.gone if self.watcher is None else None

    def args(self, timeout: float) -> dict[str, Any]:
        args: dict[str, Any] = {"code": self.code, "timeout": timeout}
        if self.files:
            args["files"] = self.files
        if self.watcher is not None:
            args["stream"] = True
        return args


class _RunnerExecuteResult(BaseModel):
    """The runner's execute result, validated: it comes from inside the sandbox."""

    outputs: list[_RunnerOutput]
    outcome: str = Field(max_length=32)
    state_lost: bool = False
    error_summary: str | None = Field(None, max_length=4096)
    dropped_bytes: dict[str, int] = Field(default_factory=dict)


@dataclass
class Session:
    """A live session and the channel to its runner."""

    claim: Claim
    sandbox: SandboxInfo
    client: RunnerClient
    execute_count: int = 0
    last_execute_at: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0
    gone: str | None = None
    """Why the session ended (expired, idle, lost, closed); set before its container is removed."""
    attempts: Attempts = field(default_factory=Attempts)
    """Its latest execute, for a retry of it (``attempts.py``)."""

    @property
    def session_id(self) -> str:
        return self.claim.session_id

    def view(self) -> SessionView:
        return SessionView(
            session_id=self.session_id,
            execute_count=self.execute_count,
            started_at=self.claim.started_at,
            last_execute_at=self.last_execute_at or self.claim.started_at,
            expires_at=self.claim.expires_at,
        )


@dataclass
class ReapReport:
    """What one reaper run removed, by reason."""

    removed: Counter[str] = field(default_factory=Counter)
    skipped: str | None = None


class SessionManager:
    """Owns every session of this instance; the API calls ``execute``, ``list`` and ``close``."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._pending: Counter[str] = Counter()
        # Per tenant, its latest execute that started a session (for a retry of it: ``attempts.py``).
        self._fresh: dict[str, Attempts] = {}
        # Sandboxes created for a new session and still starting: not orphans, however long that takes.
        self._starting: set[str] = set()
        self._create_slots = asyncio.Semaphore(settings.max_concurrent_creates)
        self.pool = WarmPool(settings, backend, metrics, has_room=self._pool_has_room)
        self._reap_lock = asyncio.Lock()
        # Set by ``stop_executes``: nothing new is taken, and calls still running end soon.
        self._stopped = asyncio.Event()

    # -- capacity ------------------------------------------------------------------------------

    def _in_use(self) -> int:
        return len(self._sessions) + sum(self._pending.values())

    def _pool_has_room(self) -> bool:
        return self._in_use() + self.pool.occupancy < self._settings.max_sessions

    def _admit(self, tenant: str) -> None:
        """Reserve room for a new session or raise 429; callers must ``_pending[tenant] -= 1``."""
        if self._stopped.is_set():
            raise _restarting()
        tenant_count = self._pending[tenant] + sum(1 for s in self._sessions.values() if s.claim.tenant == tenant)
        if tenant_count >= self._settings.max_sessions_per_tenant:
            self._metrics.admission_rejected.labels(reason="tenant_cap").inc()
            raise CapacityExhausted(
                f"tenant session cap reached ({self._settings.max_sessions_per_tenant} live sessions)", retry_after=5
            )
        # Warm containers count against the global cap, but a claim converts one rather than adding.
        if self._in_use() + (0 if self.pool.ready_count else self.pool.occupancy) >= self._settings.max_sessions:
            self._metrics.admission_rejected.labels(reason="global_cap").inc()
            raise CapacityExhausted(f"server session cap reached ({self._settings.max_sessions})", retry_after=2)
        self._pending[tenant] += 1

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reconcile with the engine, then start filling the warm pool."""
        await self.reconcile()
        await self.pool.start()

    @property
    def stopping(self) -> bool:
        """Whether the server is stopping (``stop_executes`` was called): nothing new is taken."""
        return self._stopped.is_set()

    async def stop_executes(self) -> None:
        """The server is about to stop: interrupt the executes that run, refuse those that wait (429).

        Called before the server waits for its open requests, so that each gets an answer that says
        what happened (a running execute its output so far, ``interrupted``; a queued one, nothing ran)
        instead of a connection cut at the end of the wait, which the SDKs would retry on the next
        server, running the code a second time. Sessions and their state are kept for that server.
        """
        self._stopped.set()

        async def stop(session: Session) -> None:
            with contextlib.suppress(OrchestratorError, RunnerRefused):
                await session.client.request("interrupt", {}, timeout=2)

        # Again while any is still busy: an execute whose code reached its kernel just after an interrupt
        # (it passed its turn before the stop) would otherwise run on until the server cuts it off.
        loop = asyncio.get_running_loop()
        until = loop.time() + _STOP_SECONDS
        while busy := [s for s in self._sessions.values() if s.lock.locked() and not s.client.closed]:
            await asyncio.gather(*(stop(session) for session in busy))
            if loop.time() >= until:
                return
            await asyncio.sleep(_STOP_INTERVAL)

    async def shutdown(self) -> None:
        """Stop the pool and close runner channels; containers stay for the next start to adopt."""
        # A reap pass in flight would otherwise be cancelled halfway, mid Docker call.
        async with self._reap_lock:
            pass
        await self.pool.close()
        for session in list(self._sessions.values()):
            await session.client.close()

    async def reconcile(self) -> None:
        """Adopt live claimed sandboxes, hand healthy unclaimed ones to the pool, remove the rest."""
        try:
            sandboxes = await self._backend.list()
        except OrchestratorError as exc:
            # Never remove anything on a failed listing: that is how mass kills happen.
            log.error("reconcile_skipped", error=str(exc))
            return
        now = self._clock()
        adopted = 0
        for sandbox in sandboxes:
            claim = sandbox.claim
            if claim is None:
                if not await self.pool.adopt(sandbox):
                    await self._destroy_quietly(sandbox.sandbox_id, "stray")
                continue
            if claim.session_id in self._sessions:
                continue
            if not sandbox.running or claim.expires_at <= now:
                await self._destroy_quietly(sandbox.sandbox_id, "expired" if sandbox.running else "dead")
                continue
            if not claim.listed:
                # Held by a surface of the server that stopped (a run lane): nothing to hand it back to.
                await self._destroy_quietly(sandbox.sandbox_id, "held")
                continue
            try:
                client, hello = await first_request(self._backend, sandbox, 10, "stats", {}, 10)
            except (OrchestratorError, RunnerRefused) as exc:
                log.warning("adopt_failed", session_id=claim.session_id, error=str(exc))
                await self._destroy_quietly(sandbox.sandbox_id, "unadoptable")
                continue
            session = Session(claim=claim, sandbox=sandbox, client=client)
            count, last = hello.get("execute_count"), hello.get("last_execute_at")
            session.execute_count = count if isinstance(count, int) and count >= 0 else 0
            session.last_execute_at = float(last) if isinstance(last, int | float) else None
            self._sessions[claim.session_id] = session
            adopted += 1
        self._metrics.sessions_active.set(len(self._sessions))
        log.info("reconciled", adopted=adopted, pool=self.pool.ready_count, seen=len(sandboxes))

    # -- API -----------------------------------------------------------------------------------

    def sessions_of(self, tenant: str) -> list[SessionView]:
        """The caller's live sessions, oldest first."""
        now = self._clock()
        return sorted(
            (
                s.view()
                for s in self._sessions.values()
                if s.claim.tenant == tenant and s.claim.listed and self._alive(s, now)
            ),
            key=lambda view: view.started_at,
        )

    async def execute(
        self,
        tenant: str,
        session_id: str | None,
        code: str,
        files: list[dict[str, str]] | None,
        timeout: float,
        watcher: ExecuteWatcher | None = None,
        *,
        deadline: float | None = None,
        gone: Callable[[], Awaitable[bool]] | None = None,
    ) -> ExecuteResult:
        """Run ``code`` in the caller's session, starting one when ``session_id`` is None.

        A ``watcher`` makes it a streaming execute: it hears when the code starts and each output.
        ``deadline`` (``time.monotonic``) is when the caller stops waiting; ``gone`` says whether it
        has: both are consulted once the execute's turn comes, before anything runs.

        Raises:
            SessionNotFound: unknown, expired or another tenant's session (nothing ran).
            CapacityExhausted: no room for a new session, queue full, or the caller's time almost
                spent by the wait (nothing ran).
            CallerGone: the caller left before the code's turn came (nothing ran).
            InvalidRequest: the runner refused the files (nothing ran).
            SandboxFailure: no sandbox could be provided (nothing ran).
        """
        job = _Job(code, files, timeout, watcher, deadline, gone)
        if session_id is not None:
            return await self._run(self._lookup(tenant, session_id), job)
        # A retry of a new-session execute whose client left is answered with that session's result.
        request, watched = job.request(), job.watched()
        fresh = self._fresh.setdefault(tenant, Attempts())
        if (earlier := await fresh.earlier(request, watched)) is not None:
            return await earlier
        return await fresh.run(request, watched, self._run_new(tenant, job))

    async def _run_new(self, tenant: str, job: _Job) -> ExecuteResult:
        session = await self._new_session(tenant)
        try:
            return await self._run(session, job, fresh=True)
        except OrchestratorError:
            # The caller never learns this session's id; don't leave it running.
            await self._end(session, "closed")
            raise

    async def close(self, tenant: str, session_id: str) -> None:
        """End a session now (the ``DELETE`` extension)."""
        await self._end(self._lookup(tenant, session_id), "closed")

    async def runner(self, tenant: str, session_id: str, *, reading: bool = False) -> RunnerClient:
        """The channel to the caller's session, for requests that run beside an execute (files, interrupt).

        Anything but ``reading`` (an interrupt, a file written or deleted) means the same code sent
        again next is a new request, not a retry of the session's latest execute.

        Raises:
            SessionNotFound: unknown, expired or another tenant's session, or its sandbox is lost.
        """
        session = self._lookup(tenant, session_id)
        if not reading:
            session.attempts.forget()
        if session.client.closed and not session.lock.locked():
            await self._reconnect(session)
        return session.client

    # -- sessions held by handle (other API surfaces) --------------------------------------------

    async def open(self, tenant: str, *, listed: bool = True) -> Session:
        """A new session for ``tenant``, admitted like any other; the caller must ``end`` it.

        Raises:
            CapacityExhausted: no room for a new session (nothing ran).
            SandboxFailure: no sandbox could be provided (nothing ran).
        """
        return await self._new_session(tenant, listed=listed)

    async def execute_in(
        self, session: Session, code: str, files: list[dict[str, str]] | None, timeout: float
    ) -> ExecuteResult:
        """``execute`` on a session held by handle."""
        return await self._run(session, _Job(code, files, timeout, None), fresh=True)

    async def call(self, session: Session, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Any other runner op on a session held by handle, in turn with its executes.

        Raises:
            InvalidRequest: the runner refused the arguments (nothing ran).
            RunnerFailure: the sandbox failed, perhaps mid-run; the session has been ended.
            CapacityExhausted: the server began to stop, and the call had not ended ``_STOP_SECONDS`` later.
        """
        async with self._turn(session, fresh=True):
            request = asyncio.ensure_future(session.client.request(op, args, timeout=timeout + _REPLY_SLACK))
            try:
                return await _unless_stopped(request, self._stopped)
            except RunnerRefused as exc:
                raise exc.to_error() from exc
            except RunnerFailure:
                await self._end(session, session.gone or "lost")
                raise

    async def end(self, session: Session) -> None:
        """End a session held by handle and remove its sandbox."""
        await self._end(session, "closed")

    # -- internals -----------------------------------------------------------------------------

    def _alive(self, session: Session, now: float) -> bool:
        if session.gone is not None or session.claim.expires_at <= now:
            return False
        idle = self._settings.session_idle_timeout_seconds
        last = session.last_execute_at or session.claim.started_at
        return not (idle and now - last >= idle and not session.lock.locked())

    def _lookup(self, tenant: str, session_id: str) -> Session:
        session = self._sessions.get(session_id) if looks_like_session_id(session_id) else None
        now = self._clock()
        if (
            session is None
            or session.claim.tenant != tenant
            or not session.claim.listed
            or not self._alive(session, now)
        ):
            raise _not_found(session_id)
        return session

    async def _new_session(self, tenant: str, *, listed: bool = True) -> Session:
        self._admit(tenant)
        try:
            now = self._clock()
            claim = Claim(new_session_id(), tenant, now, now + self._settings.session_lifespan_seconds, listed)
            began = time.monotonic()
            session = await self._from_pool(claim)
            source = "pool"
            if session is None:
                session = await self._cold_start(claim)
                source = "cold"
            self._metrics.session_create_seconds.labels(source=source).observe(time.monotonic() - began)
            self._sessions[claim.session_id] = session
            self._metrics.sessions_active.set(len(self._sessions))
            log.info("session_created", session_id=claim.session_id, tenant=tenant, source=source)
            return session
        finally:
            self._pending[tenant] -= 1

    async def _from_pool(self, claim: Claim) -> Session | None:
        while (warm := self.pool.take()) is not None:
            sandbox, client = warm
            try:
                claimed = await self._backend.claim(sandbox, claim)
            except SandboxTaken:
                # Another control plane's session runs there now: removing it would end that session.
                await client.close()
                continue
            except OrchestratorError as exc:
                log.warning("pool_claim_failed", error=str(exc))
                await client.close()
                await self._destroy_quietly(sandbox.sandbox_id, "pool_broken")
                continue
            return Session(claim=claim, sandbox=claimed, client=client)
        return None

    async def _cold_start(self, claim: Claim) -> Session:
        # Nothing has run yet, so one more container is cheaper than an error the caller must retry.
        try:
            return await self._start_one(claim)
        except SandboxStartFailed as exc:
            log.warning("sandbox_start_retry", session_id=claim.session_id, error=str(exc))
        return await self._start_one(claim)

    async def _start_one(self, claim: Claim) -> Session:
        try:
            async with asyncio.timeout(self._settings.create_wait_seconds):
                await self._create_slots.acquire()
        except TimeoutError:
            self._metrics.admission_rejected.labels(reason="create_queue").inc()
            raise CapacityExhausted(
                "new sessions are starting as fast as this server can start them; try again shortly", retry_after=5
            ) from None
        try:
            sandbox = await self._backend.create(claim)
            self._starting.add(sandbox.sandbox_id)
            try:
                client = await ready_client(self._backend, sandbox, self._settings.runner_ready_timeout_seconds)
            except (OrchestratorError, RunnerRefused) as exc:
                await self._destroy_quietly(sandbox.sandbox_id, "start_failed")
                raise SandboxStartFailed(f"sandbox did not become ready: {exc}") from exc
            finally:
                self._starting.discard(sandbox.sandbox_id)
        finally:
            self._create_slots.release()
        return Session(claim=claim, sandbox=sandbox, client=client)

    async def _run(self, session: Session, job: _Job, *, fresh: bool = False) -> ExecuteResult:
        # A new session's first execute is kept for a retry by its tenant (``execute``), not here: its
        # caller has no session id to retry it with, and kept twice it could be handed out twice.
        attempts = None if fresh else session.attempts
        request, watched = job.request(), job.watched()
        if attempts is not None and (earlier := await attempts.earlier(request, watched)) is not None:
            return await earlier
        async with self._turn(session, fresh=fresh):
            work = self._send(session, job, await job.budget())
            return await (work if attempts is None else attempts.run(request, watched, work))

    @contextlib.asynccontextmanager
    async def _turn(self, session: Session, *, fresh: bool) -> AsyncIterator[None]:
        """Wait for the session's previous request, in arrival order, then hold it."""
        if session.waiting >= self._settings.max_queued_per_session:
            self._metrics.admission_rejected.labels(reason="queue_full").inc()
            raise CapacityExhausted("too many executes queued on this session", retry_after=1)
        session.waiting += 1
        try:
            await session.lock.acquire()
        finally:
            session.waiting -= 1
        try:
            if self._stopped.is_set():
                raise _restarting()
            # A session made for this request runs its first code even if starting it took long.
            if not fresh and not self._alive(session, self._clock()):
                raise _not_found(session.session_id)
            if session.client.closed:
                await self._reconnect(session)
            yield
        finally:
            session.lock.release()

    async def _reconnect(self, session: Session) -> None:
        try:
            session.client = await self._backend.connect(session.sandbox, timeout=10)
        except OrchestratorError as exc:
            await self._end(session, "lost")
            raise SessionNotFound(
                f"Session {session.session_id} was lost: its sandbox stopped answering", param="session_id"
            ) from exc

    async def _send(self, session: Session, job: _Job, timeout: float) -> ExecuteResult:
        if self._stopped.is_set():
            raise _restarting()  # asked since its turn came (the budget may have waited)
        sent = _Streamed()
        listener = None if job.watcher is None else functools.partial(_relay, job.watcher, session.session_id, sent)
        began = time.monotonic()
        try:
            raw = await session.client.request(
                "execute", job.args(timeout), timeout=timeout + _REPLY_SLACK, on_progress=listener
            )
        except RunnerRefused as exc:
            if exc.code == "kernel_not_ready":
                # Nothing ran, and nothing will: a 404 ends the caller's retries on this session.
                await self._end(session, "lost")
                raise SessionNotFound(
                    f"Session {session.session_id} was lost: its kernel cannot start ({exc.message})",
                    param="session_id",
                ) from exc
            raise exc.to_error() from exc
        except RunnerFailure as exc:
            return await self._failed_mid_execute(session, str(exc), sent)
        try:
            result = _RunnerExecuteResult.model_validate(raw)
        except ValidationError:
            return await self._failed_mid_execute(session, "the sandbox sent a malformed reply", sent)
        outputs = [o.model_dump() for o in result.outputs]
        if self._stopped.is_set() and result.outcome == "interrupted":
            outputs.append({"type": "stderr", "data": _STOPPED})
        session.execute_count += 1
        session.last_execute_at = self._clock()
        self._metrics.executions.labels(outcome=result.outcome if result.outcome in _KNOWN else "other").inc()
        self._metrics.execute_seconds.observe(time.monotonic() - began)
        return ExecuteResult(
            session_id=session.session_id,
            outputs=outputs,
            error_summary=result.error_summary,
            outcome=result.outcome,
            state_lost=result.state_lost,
            dropped_bytes=result.dropped_bytes,
        )

    async def _failed_mid_execute(self, session: Session, detail: str, sent: _Streamed) -> ExecuteResult:
        """The code may have run: answer 200 with what happened (``sent``: the outputs streamed so far), and
        end the session."""
        reason = session.gone or "lost"
        if reason in {"expired", "idle"}:
            message = (
                f"SessionExpired: session {session.session_id} reached the end of its lifespan while this "
                "code was running; its sandbox was removed. Start a new session."
            )
        elif reason == "closed":
            message = (
                f"SessionClosed: session {session.session_id} was closed (DELETE) while this code was "
                "running; its sandbox was removed. Start a new session."
            )
        else:
            message = (
                f"SandboxError: the session's sandbox failed while running this code ({detail}). "
                "The session has ended; start a new session."
            )
            await self._end(session, "lost")
        self._metrics.executions.labels(outcome="sandbox_lost").inc()
        return ExecuteResult(
            session_id=session.session_id,
            outputs=[*sent.outputs(), {"type": "error", "data": message}],
            error_summary=message.split(":", 1)[0],
            outcome="sandbox_lost",
            state_lost=True,
        )

    async def _end(self, session: Session, reason: str) -> None:
        if session.gone is None:
            session.gone = reason
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
        self._metrics.sessions_active.set(len(self._sessions))
        await session.client.close()
        await self._destroy_quietly(session.sandbox.sandbox_id, reason)

    async def _destroy_quietly(self, sandbox_id: str, reason: str) -> bool:
        try:
            await self._backend.destroy(sandbox_id)
        except OrchestratorError as exc:
            log.warning("destroy_failed", sandbox=sandbox_id[:12], reason=reason, error=str(exc))
            return False
        self._metrics.removed.labels(reason=reason).inc()
        return True

    # -- reaper policy -------------------------------------------------------------------------

    async def reap(self) -> ReapReport:
        """One reaper pass; see ``reaper.py`` for the schedule. Safe to race executes."""
        report = ReapReport()
        if self._reap_lock.locked():
            report.skipped = "already running"
            return report
        async with self._reap_lock:
            now = self._clock()
            for session in list(self._sessions.values()):
                if not self._alive(session, now):
                    reason = "expired" if session.claim.expires_at <= now else (session.gone or "idle")
                    session.gone = session.gone or reason
                    await self._end(session, reason)
                    report.removed[reason] += 1
            try:
                sandboxes = await self._backend.list()
            except OrchestratorError as exc:
                report.skipped = f"listing failed: {exc}"
                return report
            seen = {s.sandbox_id for s in sandboxes}
            for session in list(self._sessions.values()):
                if session.sandbox.sandbox_id not in seen:
                    await self._end(session, "vanished")
                    report.removed["vanished"] += 1
            known = {s.sandbox.sandbox_id for s in self._sessions.values()} | self.pool.sandbox_ids() | self._starting
            for sandbox in sandboxes:
                if sandbox.sandbox_id in known:
                    owner = self._session_for(sandbox.sandbox_id)
                    if owner is not None and not sandbox.running:
                        await self._end(owner, "dead")
                        report.removed["dead"] += 1
                    continue
                young = now - sandbox.created_at < self._settings.orphan_grace_seconds
                # Young means possibly mid-start (created, not yet running, not yet indexed).
                if young:
                    continue
                if await self._destroy_quietly(sandbox.sandbox_id, "orphan"):
                    report.removed["orphan"] += 1
            report.removed.update(await self.pool.prune(sandboxes, now))
        return report

    def _session_for(self, sandbox_id: str) -> Session | None:
        for session in self._sessions.values():
            if session.sandbox.sandbox_id == sandbox_id:
                return session
        return None


def _not_found(session_id: str) -> SessionNotFound:
    return SessionNotFound(f"Session {session_id!r} not found or expired", param="session_id")


async def _unless_stopped(work: asyncio.Future[T], stopped: asyncio.Event) -> T:
    """``work``'s result, unless the server stops and it has not ended within ``_STOP_SECONDS`` of that.

    A stopping server interrupts executes; a program in a run lane does not stop for that (it has a
    process group of its own), and the server would cut its request off at the end of its grace with a
    bare 500. What it would report then is not the program's own outcome, so the caller may send it again.
    """
    stop = asyncio.ensure_future(stopped.wait())
    either: set[asyncio.Future[Any]] = {work, stop}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            await asyncio.wait({work}, timeout=_STOP_SECONDS)
        if not work.done():
            raise CapacityExhausted("the server is stopping and cut this run off before it ended: send it again")
        return work.result()
    finally:
        stop.cancel()
        work.cancel()  # nothing when it is done; a caller cancelled meanwhile takes its request along


def _restarting() -> CapacityExhausted:
    return CapacityExhausted("the server is restarting; nothing ran: send it again", retry_after=1)


_KNOWN = frozenset({"ok", "error", "timeout", "interrupted", "oom", "kernel_died", "not_run"})
