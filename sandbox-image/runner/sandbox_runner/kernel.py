"""Supervision of one IPython kernel, spoken to through jupyter_client's client and session.

The kernel is a child process; its death (OOM kill, segfault, ``os._exit``) is observed, explained
and followed by a restart, never shared by the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.session import Session

from . import procs
from .config import MiB, RunnerConfig
from .containment import Containment
from .launch import LaunchedKernel, start_kernel
from .outputs import OutputCollector

log = logging.getLogger("sandbox_runner")

# How often liveness and memory are checked while waiting for kernel messages.
_POLL: Final = 0.1
_READY_TIMEOUT: Final = 60.0
# A kernel_info request is sent again this often while a starting kernel has not answered.
_READY_RESEND: Final = 1.0
# Messages kept per socket when nobody reads them (a background thread printing between executes).
_INBOX_LIMIT: Final = 10_000
_STATE_LOST: Final = "The kernel was restarted: variables, imports and other session state are lost."


@dataclass
class ExecOutcome:
    """What one execute produced. ``outcome`` is one of ok, error, timeout, oom, kernel_died, not_run."""

    outputs: list[dict[str, Any]]
    outcome: str
    state_lost: bool = False
    execution_count: int | None = None
    error_summary: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    duration_ms: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        """The ``execute`` result of the runner protocol."""
        return {
            "outputs": self.outputs,
            "outcome": self.outcome,
            "state_lost": self.state_lost,
            "execution_count": self.execution_count,
            "error_summary": self.error_summary,
            "dropped_bytes": self.dropped,
            "duration_ms": round(self.duration_ms, 3),
        }


class KernelSupervisor:
    """Owns the kernel process and its client; restarts it whenever it is lost."""

    def __init__(self, config: RunnerConfig, env: dict[str, str], launched: LaunchedKernel | None = None) -> None:
        self._config = config
        self._env = env
        # A kernel started before this module was imported (see launch.py), taken over by start().
        self._launched = launched
        self._kernel: LaunchedKernel | None = None
        self._link: _Link | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.startup_seconds: float | None = None
        self.start_error: str | None = None
        self._memory_limit = config.kernel_memory_bytes or self._derived_memory_limit()
        # The cgroup's OOM kill count when the kernel was last seen well; read between executes so
        # that no execute waits for it.
        self._oom_baseline = procs.oom_kill_count()
        self._containment = Containment()

    def _derived_memory_limit(self) -> int | None:
        limit = procs.cgroup_memory_limit()
        if limit is None:
            return None
        return max(limit - self._config.memory_reserve_bytes, limit // 2)

    @property
    def pid(self) -> int | None:
        """The kernel's process id while it runs."""
        return self._kernel.process.pid if self._kernel is not None else None

    def alive(self) -> bool:
        """Whether the kernel process is still running."""
        return self._kernel is not None and self._kernel.process.poll() is None

    async def start(self) -> None:
        """Start the kernel (or take over the one started early) and wait until it answers."""
        self.ready.clear()
        launched, self._launched = self._launched, None
        if launched is None:
            launched = start_kernel(self._env, self._config.workdir)
        procs.raise_oom_score(launched.process.pid)
        kc = AsyncKernelClient()
        kc.load_connection_info(cast("KernelConnectionInfo", launched.connection))
        # No heartbeat (the process itself is watched) and no stdin or control channel (unused).
        kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)  # noqa: S604 - channels
        link = _Link(kc)
        try:
            await _wait_until_ready(link, launched, _READY_TIMEOUT)
        except BaseException:
            link.close()
            await _kill(launched)
            launched.discard()
            raise
        self._kernel, self._link = launched, link
        self._oom_baseline = procs.oom_kill_count()
        self.startup_seconds = time.monotonic() - launched.started_at
        self.ready.set()

    async def restart(self) -> bool:
        """Kill whatever is left of the kernel and start a fresh one; False if it did not start."""
        self.ready.clear()
        await self._stop()
        # The dead kernel's children (a memory hog, a server) must not hold on to memory while the new
        # kernel starts; until it does, every descendant of the runner is such a leftover.
        procs.kill_leftovers(keep=set())
        self.restarts += 1
        try:
            await self.start()
        except Exception as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            log.exception("kernel restart failed")
            return False
        return True

    async def _restart_note(self) -> str:
        """Restart the kernel and say what the caller lost (and whether the session can go on)."""
        if await self.restart():
            return _STATE_LOST
        return f"{_STATE_LOST} The kernel did not start again ({self.start_error}); the session cannot run more code."

    async def _stop(self) -> None:
        if self._link is not None:
            self._link.close()
        if self._kernel is not None:
            await _kill(self._kernel)
            self._kernel.discard()
        self._kernel = self._link = None

    async def shutdown(self) -> None:
        """Stop the kernel for good (runner exit), including one started early and never taken over."""
        await self._stop()
        if self._launched is not None:
            await _kill(self._launched)
            self._launched.discard()
            self._launched = None

    def settle(self) -> None:
        """Bookkeeping after an execute, once its reply is out."""
        self._oom_baseline = procs.oom_kill_count()

    async def interrupt(self) -> None:
        """Send SIGINT to the kernel's process group (the running execute sees KeyboardInterrupt)."""
        if self._kernel is not None and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._kernel.process.pid, signal.SIGINT)

    async def execute(
        self, code: str, timeout: float, on_output: Callable[[dict[str, Any]], None] | None = None
    ) -> ExecOutcome:
        """Run ``code``; every failure is described in the outcome, never raised.

        ``on_output`` is told of each output as the kernel produces it (see ``OutputCollector``).
        """
        began = time.monotonic()
        self._containment.begin()
        outcome = await self._execute(code, timeout, on_output)
        if not outcome.state_lost and self.pid is not None and self._containment.check(self.pid, final=True):
            # What the code left in the kernel itself (threads, open files) would starve the next execute.
            outcome = await self._on_runaway(OutputCollector(self._config.limits, on_output), outcome)
        note = await self._containment.finish(self.pid)
        if note:
            item = {"type": "stderr", "data": note}
            outcome.outputs.append(item)
            if on_output is not None:
                on_output(item)
        outcome.duration_ms = (time.monotonic() - began) * 1000
        return outcome

    async def _execute(
        self, code: str, timeout: float, on_output: Callable[[dict[str, Any]], None] | None
    ) -> ExecOutcome:
        collector = OutputCollector(self._config.limits, on_output)
        if not self.alive():
            _, cause = self._death_cause(self._oom_baseline, watchdog=False)
            note = await self._restart_note()
            collector.add_error(
                f"KernelDied: the kernel stopped since the last execute ({cause}). {note} "
                "Your code was not run; send it again."
            )
            return self._outcome(collector, "not_run", state_lost=True)
        assert self._link is not None
        oom_before = self._oom_baseline
        msg_id = self._link.client.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        loop = asyncio.get_running_loop()
        status = await self._collect(msg_id, collector, loop.time() + timeout)
        if status == "idle":
            count = await self._reply_count(msg_id)
            return self._outcome(collector, "error" if collector.error_summary else "ok", execution_count=count)
        if status == "timeout":
            return await self._on_timeout(msg_id, collector, timeout)
        if status == "runaway":
            return await self._on_runaway(collector)
        watchdog = status == "memory"
        if watchdog and self._kernel is not None:
            await _kill(self._kernel)
        kind, cause = self._death_cause(oom_before, watchdog)
        note = await self._restart_note()
        collector.add_error(f"KernelDied: {cause}. {note}")
        return self._outcome(collector, kind, state_lost=True)

    async def _collect(self, msg_id: str, collector: OutputCollector, deadline: float) -> str:
        """Feed iopub messages of ``msg_id`` to ``collector``; return idle, timeout, dead, memory or runaway."""
        assert self._link is not None
        inbox = self._link.iopub
        loop = asyncio.get_running_loop()
        next_check = loop.time() + _POLL
        while True:
            now = loop.time()
            if now >= deadline:
                return "timeout"
            if now >= next_check:
                next_check = now + _POLL
                if not self.alive():
                    return "dead"
                # Before the memory check, which reads every process's page tables: slow under a bomb.
                if self.pid is not None and self._containment.check(self.pid):
                    return "runaway"
                if self._over_memory():
                    return "memory"
            msg = await inbox.get(min(deadline, next_check))
            if msg is None or msg["parent_header"].get("msg_id") != msg_id:
                continue
            msg_type = msg["header"].get("msg_type")
            if msg_type == "status":
                if msg["content"].get("execution_state") == "idle":
                    return "idle"
                continue
            collector.feed(msg_type, msg["content"])

    async def _reply_count(self, msg_id: str) -> int | None:
        assert self._link is not None
        inbox = self._link.shell
        deadline = asyncio.get_running_loop().time() + 1.0
        while (reply := await inbox.get(deadline)) is not None:
            if reply["parent_header"].get("msg_id") == msg_id:
                count = reply["content"].get("execution_count")
                return count if isinstance(count, int) else None
        return None

    async def _on_timeout(self, msg_id: str, collector: OutputCollector, timeout: float) -> ExecOutcome:
        await self.interrupt()
        loop = asyncio.get_running_loop()
        status = await self._collect(msg_id, collector, loop.time() + self._config.interrupt_grace)
        collector.drop_keyboard_interrupt()
        limit = f"{timeout:g}"
        if status == "idle":
            await self._reply_count(msg_id)
            collector.add_error(
                f"TimeoutError: execution exceeded the {limit} s time limit and was interrupted. Session state is kept."
            )
            return self._outcome(collector, "timeout")
        if self._kernel is not None:
            await _kill(self._kernel)
        note = await self._restart_note()
        collector.add_error(
            f"TimeoutError: execution exceeded the {limit} s time limit and did not stop when interrupted. {note}"
        )
        return self._outcome(collector, "timeout", state_lost=True)

    async def _on_runaway(self, collector: OutputCollector, done: ExecOutcome | None = None) -> ExecOutcome:
        """Restart a kernel that is itself the runaway; ``done``: the outcome of code that had finished."""
        if self._kernel is not None:
            await _kill(self._kernel)
        note = await self._restart_note()
        collector.add_error(f"KernelDied: the kernel was stopped: {self._containment.culprit}. {note}")
        outcome = self._outcome(collector, "kernel_died", state_lost=True)
        if done is not None:
            outcome.outputs[:0] = done.outputs
            outcome.execution_count = done.execution_count
            outcome.dropped = done.dropped
        return outcome

    def _over_memory(self) -> bool:
        pid = self.pid
        return self._memory_limit is not None and pid is not None and procs.tree_memory_exceeds(pid, self._memory_limit)

    def _death_cause(self, oom_before: int | None, watchdog: bool) -> tuple[str, str]:
        """(outcome kind, explanation) for a kernel that is gone."""
        code = self._kernel.process.poll() if self._kernel is not None else None
        if watchdog or (oom_before is not None and procs.oom_kill_count() > oom_before):
            limit = self._memory_limit or procs.cgroup_memory_limit()
            size = f" (limit {limit // MiB} MiB)" if limit else ""
            return "oom", f"the kernel ran out of memory{size} and was killed"
        if code is not None and code < 0:
            number = -code
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = "unknown signal"
            return "kernel_died", f"the kernel was killed by signal {number} ({name})"
        if code is None:
            return "kernel_died", "the kernel stopped responding"
        return "kernel_died", f"the kernel exited with status {code}"

    @staticmethod
    def _outcome(
        collector: OutputCollector,
        kind: str,
        *,
        state_lost: bool = False,
        execution_count: int | None = None,
    ) -> ExecOutcome:
        outputs = collector.finish()
        return ExecOutcome(
            outputs=outputs,
            outcome=kind,
            state_lost=state_lost,
            execution_count=execution_count,
            error_summary=collector.error_summary,
            dropped={k: v for k, v in collector.dropped.items() if v},
        )


class _Inbox:
    """Every message one kernel socket delivers, in order, read by a task of its own.

    Waiting with a timeout then cancels a queue read, which loses nothing. A cancelled *receive*
    could: one cancelled just after it took a message off the socket drops that message, and an
    ``idle`` lost so stalls an execute until its timeout.
    """

    def __init__(self, socket: zmq.asyncio.Socket, session: Session) -> None:
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(socket, session))

    async def _pump(self, socket: zmq.asyncio.Socket, session: Session) -> None:
        with contextlib.suppress(zmq.ZMQError):  # the socket was closed
            while True:
                message = _decode(session, await socket.recv_multipart())
                if message is None:
                    continue
                if self._queue.qsize() >= _INBOX_LIMIT:
                    self._queue.get_nowait()  # nobody is reading (output between executes): keep the newest
                self._queue.put_nowait(message)

    async def get(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or None if none came before ``deadline`` (loop time)."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            return None

    def close(self) -> None:
        self._task.cancel()


class _Link:
    """The client of one kernel and the inboxes of the two sockets the runner reads."""

    def __init__(self, client: AsyncKernelClient) -> None:
        self.client = client
        self.iopub = _Inbox(client.iopub_channel.socket, client.session)
        self.shell = _Inbox(client.shell_channel.socket, client.session)

    def close(self) -> None:
        self.iopub.close()
        self.shell.close()
        self.client.stop_channels()


def _decode(session: Session, parts: list[bytes]) -> dict[str, Any] | None:
    """A Jupyter message's header, parent header and content; None if it is malformed or forged.

    ``Session.deserialize`` also turns every date in the headers into a ``datetime`` through
    dateutil, which costs more than the rest of a small execute's handling; only ids, the message
    type and the content are needed here. The signature is still checked.
    """
    _, frames = session.feed_identities(parts)
    if len(frames) < 5:
        return None
    signature, *signed = (frame if isinstance(frame, bytes) else frame.bytes for frame in frames[:5])
    if session.auth is not None and not hmac.compare_digest(signature, session.sign(signed)):
        log.warning("dropped a kernel message with a bad signature")
        return None
    try:
        # The session's unpacker, not json.loads: it replaces invalid UTF-8 (lone surrogates) instead of failing.
        header, parent, _, content = (session.unpack(part) for part in signed)
        message = {"header": header, "parent_header": parent, "content": content}
    except ValueError:
        return None
    return message if all(isinstance(part, dict) for part in message.values()) else None


async def _wait_until_ready(link: _Link, kernel: LaunchedKernel, timeout: float) -> None:
    """Return once the kernel answers ``kernel_info`` and our iopub subscription is live.

    Output published before the subscription reaches the kernel is lost, so a reply on shell
    alone is not enough: some message must also have come through iopub (ipykernel greets each
    new subscriber with ``iopub_welcome``; older kernels show the status of a kernel_info).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    iopub_live = replied = False
    resend_at = loop.time()
    while not (iopub_live and replied):
        now = loop.time()
        code = kernel.process.poll()
        if code is not None:
            raise RuntimeError(f"the kernel exited with status {code} while starting")
        if now >= deadline:
            raise TimeoutError(f"the kernel did not answer within {timeout:g} s")
        if now >= resend_at:
            link.client.kernel_info()
            resend_at = now + _READY_RESEND
        step = min(deadline, resend_at, now + _POLL)
        if not iopub_live:
            iopub_live = await link.iopub.get(step) is not None
            continue
        reply = await link.shell.get(step)
        replied = reply is not None and reply["header"].get("msg_type") == "kernel_info_reply"


async def _kill(kernel: LaunchedKernel) -> None:
    """SIGKILL the kernel's process group and wait (briefly) for the process to go."""
    process = kernel.process
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    deadline = time.monotonic() + 5
    # A Popen offers no awaitable exit: poll it.
    while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
