"""Supervision of one interpreter process (``interpreter.py``), spoken to over a socketpair.

The interpreter (called the kernel here and on the wire, as in Jupyter) is a child process; its death
(OOM kill, segfault, ``os._exit``) is observed, explained and followed by a restart, never shared by
the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from . import procs
from .config import MiB, RunnerConfig
from .containment import Containment
from .launch import LaunchedKernel, start_kernel
from .outputs import OutputCollector
from .protocol import ProtocolError, encode_frame, read_interpreter_frame

log = logging.getLogger("sandbox_runner")

# How often liveness and memory are checked while waiting for kernel messages; more often once the
# container's memory is past half the watchdog's limit, so that the watchdog, not the kernel's OOM
# killer, stops a fast-growing cell: a kernel kill leaves the container at its limit while the dead
# interpreter's memory is torn down, and a runner that allocates then is the only task left to kill.
_POLL: Final = 0.1
_PRESSED_POLL: Final = 0.01
_READY_TIMEOUT: Final = 60.0
# How often a timed-out execute looks again whether its cell has started, to interrupt it.
_ARMING_POLL: Final = 0.01
# How long an interrupt request waits for a cell that has not started yet.
_ARMING_WAIT: Final = 2.0
# Frames kept when nobody reads them.
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
        self._link: _Connection | None = None
        self._cell = 0
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
        # Twice the interpreter's own cap: an error it shortens to fit may still exceed it in UTF-8.
        link = await _Connection.open(launched, 2 * self._config.limits.max_frame_bytes)
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

    async def interrupt_cell(self, running: Callable[[], bool]) -> None:
        """Interrupt the cell of a running execute once the kernel has SIGINT armed (while ``running()``,
        for up to ``_ARMING_WAIT``): sent before the cell has started, it would be ignored."""
        loop = asyncio.get_running_loop()
        until = loop.time() + _ARMING_WAIT
        # The kernel's signal mask has no event to wait on: poll it.
        while running() and self.pid is not None and procs.ignores(self.pid, signal.SIGINT) and loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(_ARMING_POLL)
        await self.interrupt()

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
        self._cell += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._link.send({"cell": self._cell, "code": code})
        except (TimeoutError, OSError):
            pass  # a wedged or gone interpreter: _collect tells which
        status, done = await self._collect(collector, deadline)
        if status == "idle":
            kind = "error" if collector.error_summary else "ok"
            count = done.get("execution_count")
            outcome = self._outcome(collector, kind, execution_count=count if type(count) is int else None)
            if done.get("exit") is True:
                # exit() or quit(): as a notebook does, the kernel is restarted, and the reply says so.
                outcome.state_lost = True
                await self.restart()
            return outcome
        if status == "timeout":
            return await self._on_timeout(collector, timeout)
        if status == "runaway":
            return await self._on_runaway(collector)
        watchdog = status == "memory"
        # A dying process closes its socket before it can be waited for: give it a moment to be seen dead.
        if not watchdog and self._kernel is not None:
            await _wait_exit(self._kernel, 1.0)
        # Alive after "dead": the connection broke (user code closed or wrote on the interpreter's socket).
        broken = None if watchdog or not self.alive() or self._link is None else self._link.broken
        if self._kernel is not None and (watchdog or broken is not None):
            await _kill(self._kernel)
        kind, cause = self._death_cause(oom_before, watchdog)
        if broken is not None and kind != "oom":
            cause = f"the kernel was stopped because {broken}"
        note = await self._restart_note()
        collector.add_error(f"KernelDied: {cause}. {note}")
        return self._outcome(collector, kind, state_lost=True)

    async def _collect(self, collector: OutputCollector, deadline: float) -> tuple[str, dict[str, Any]]:
        """Feed the current cell's frames to ``collector``; (idle, its ``done`` frame), or timeout, dead,
        memory or runaway."""
        assert self._link is not None
        link = self._link
        loop = asyncio.get_running_loop()
        next_check = loop.time() + _POLL
        while True:
            now = loop.time()
            if now >= deadline:
                return "timeout", {}
            if now >= next_check:
                next_check = now + (_PRESSED_POLL if self._memory_pressed() else _POLL)
                if not self.alive():
                    return "dead", {}
                # Before the memory check, which reads every process's page tables: slow under a bomb.
                if self.pid is not None and self._containment.check(self.pid):
                    return "runaway", {}
                if self._over_memory():
                    return "memory", {}
            msg = await link.get(min(deadline, next_check))
            if msg is None:
                if link.broken is not None:
                    return "dead", {}
                continue
            msg_type = msg.get("type")
            if msg_type == "done":
                if msg.get("cell") == self._cell:
                    collector.add_source_drops(msg.get("dropped"))
                    return "idle", msg
                continue  # a late or forged one
            if isinstance(msg_type, str):
                collector.feed(msg_type, msg)

    async def _on_timeout(self, collector: OutputCollector, timeout: float) -> ExecOutcome:
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + self._config.interrupt_grace
        status = "timeout"
        while loop.time() < grace_ends:
            if self.pid is not None and procs.ignores(self.pid, signal.SIGINT) is False:
                await self.interrupt()  # once: a second would cut the cell's own handling of the first short
                status, _ = await self._collect(collector, grace_ends)
                break
            # The interpreter ignores SIGINT between cells: one sent before this cell had started (a time
            # limit shorter than the trip) would be lost, and the cell would run on until it is killed,
            # its session's state with it. Code that ignores SIGINT itself is killed when the grace ends.
            status, _ = await self._collect(collector, min(grace_ends, loop.time() + _ARMING_POLL))
            if status != "timeout":
                break
        collector.drop_keyboard_interrupt()
        limit = f"{timeout:g}"
        if status == "idle":
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

    def _memory_pressed(self) -> bool:
        """Whether the container's whole charge is past half the watchdog's limit (one held read)."""
        if self._memory_limit is None:
            return False
        usage = procs.cgroup_memory_usage()
        return usage is not None and usage > self._memory_limit // 2

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


class _Connection:
    """Frames from one interpreter, in order, read by a task of their own.

    Waiting with a timeout then cancels a queue read, which loses nothing (a cancelled read of the
    stream itself could lose half a frame). The interpreter is untrusted: user code can write on its
    socket, so an unreadable frame ends the connection like a closed one.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int) -> None:
        self._writer = writer
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.broken: str | None = None
        self._task = asyncio.create_task(self._pump(reader, max_frame))

    @classmethod
    async def open(cls, kernel: LaunchedKernel, max_frame: int) -> _Connection:
        reader, writer = await asyncio.open_unix_connection(sock=kernel.sock, limit=2**20)
        return cls(reader, writer, max_frame)

    async def _pump(self, reader: asyncio.StreamReader, max_frame: int) -> None:
        try:
            while True:
                message = await read_interpreter_frame(reader, max_frame)
                if self._queue.qsize() >= _INBOX_LIMIT:
                    self._queue.get_nowait()  # nobody is reading: keep the newest
                self._queue.put_nowait(message)
        except EOFError:
            self.broken = "its connection to the runner was closed"
        except (ProtocolError, OSError) as exc:
            self.broken = f"it sent an unreadable message ({exc})"
        self._queue.put_nowait(None)

    async def get(self, deadline: float) -> dict[str, Any] | None:
        """The next frame, or None if none came before ``deadline`` (loop time) or the connection broke."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            return None

    async def send(self, message: dict[str, Any]) -> None:
        self._writer.write(encode_frame(message))
        await self._writer.drain()

    def close(self) -> None:
        self._task.cancel()
        self._writer.close()


async def _wait_until_ready(connection: _Connection, kernel: LaunchedKernel, timeout: float) -> None:
    """Return once the interpreter says it is ready; raise if it dies or takes longer than ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        code = kernel.process.poll()
        if code is not None:
            raise RuntimeError(f"the interpreter exited with status {code} while starting")
        if connection.broken is not None:
            raise RuntimeError(f"the interpreter failed while starting: {connection.broken}")
        now = loop.time()
        if now >= deadline:
            raise TimeoutError(f"the interpreter did not start within {timeout:g} s")
        message = await connection.get(min(deadline, now + _POLL))
        if message is not None and message.get("type") == "ready":
            return


async def _kill(kernel: LaunchedKernel) -> None:
    """SIGKILL the kernel's process group and wait (briefly) for the process to go."""
    process = kernel.process
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await _wait_exit(kernel, 5.0)


async def _wait_exit(kernel: LaunchedKernel, seconds: float) -> None:
    """Wait up to ``seconds`` for the process to exit."""
    deadline = time.monotonic() + seconds
    # A Popen offers no awaitable exit: poll it.
    while kernel.process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
