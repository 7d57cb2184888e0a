"""Supervision of one IPython kernel through jupyter_client.

The kernel is a child process; its death (OOM kill, segfault, ``os._exit``) is observed, explained
and followed by a restart, never shared by the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Final

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

from . import procs
from .config import MiB, RunnerConfig
from .outputs import OutputCollector

log = logging.getLogger("sandbox_runner")

# How often liveness and memory are checked while waiting for kernel messages.
_POLL: Final = 0.1
_KERNEL_ARGS: Final = (
    "--HistoryManager.enabled=False",
    "--IPKernelApp.extensions=sandbox_runner.kernel_ext",
    "--Completer.use_jedi=False",
)
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

    def __init__(self, config: RunnerConfig, env: dict[str, str]) -> None:
        self._config = config
        self._env = env
        self._km: AsyncKernelManager | None = None
        self._kc: AsyncKernelClient | None = None
        self.ready = asyncio.Event()
        self.restarts = 0
        self.startup_seconds: float | None = None
        self.start_error: str | None = None
        self._memory_limit = config.kernel_memory_bytes or self._derived_memory_limit()

    def _derived_memory_limit(self) -> int | None:
        limit = procs.cgroup_memory_limit()
        if limit is None:
            return None
        return max(limit - self._config.memory_reserve_bytes, limit // 2)

    @property
    def pid(self) -> int | None:
        """The kernel's process id while it runs."""
        process = self._process()
        return process.pid if process is not None else None

    def _process(self) -> subprocess.Popen[bytes] | None:
        if self._km is None or self._km.provisioner is None:
            return None
        return getattr(self._km.provisioner, "process", None)

    def alive(self) -> bool:
        """Whether the kernel process is still running."""
        process = self._process()
        return process is not None and process.poll() is None

    async def start(self) -> None:
        """Start the kernel and wait until it answers; sets ``ready``."""
        began = time.monotonic()
        self.ready.clear()
        km = AsyncKernelManager(kernel_name="python3")
        await km.start_kernel(
            extra_arguments=list(_KERNEL_ARGS),
            env=self._env,
            cwd=str(self._config.workdir),
            # The runner's own stdout is the protocol channel: the kernel must never inherit it.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
        except Exception:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)
            raise
        self._km, self._kc = km, kc
        if self.pid is not None:
            procs.raise_oom_score(self.pid)
        self.startup_seconds = time.monotonic() - began
        self.ready.set()

    async def restart(self) -> bool:
        """Kill whatever is left of the kernel and start a fresh one; False if it did not start."""
        self.ready.clear()
        if self._kc is not None:
            self._kc.stop_channels()
        if self._km is not None:
            with contextlib.suppress(Exception):
                await self._km.shutdown_kernel(now=True)
        self._km = self._kc = None
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

    async def shutdown(self) -> None:
        """Stop the kernel for good (runner exit)."""
        if self._kc is not None:
            self._kc.stop_channels()
        if self._km is not None:
            with contextlib.suppress(Exception):
                await self._km.shutdown_kernel(now=True)

    async def interrupt(self) -> None:
        """Send SIGINT to the kernel (the running execute sees KeyboardInterrupt)."""
        if self._km is not None and self.alive():
            await self._km.interrupt_kernel()

    async def execute(self, code: str, timeout: float) -> ExecOutcome:
        """Run ``code``; every failure is described in the outcome, never raised."""
        began = time.monotonic()
        outcome = await self._execute(code, timeout)
        outcome.duration_ms = (time.monotonic() - began) * 1000
        return outcome

    async def _execute(self, code: str, timeout: float) -> ExecOutcome:
        collector = OutputCollector(self._config.limits)
        if not self.alive():
            _, cause = self._death_cause(oom_before=None, watchdog=False)
            note = await self._restart_note()
            collector.add_error(
                f"KernelDied: the kernel stopped since the last execute ({cause}). {note} "
                "Your code was not run; send it again."
            )
            return self._outcome(collector, "not_run", state_lost=True)
        assert self._kc is not None
        oom_before = procs.oom_kill_count()
        msg_id = self._kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        loop = asyncio.get_running_loop()
        status = await self._collect(msg_id, collector, loop.time() + timeout)
        if status == "idle":
            count = await self._reply_count(msg_id)
            return self._outcome(collector, "error" if collector.error_summary else "ok", execution_count=count)
        if status == "timeout":
            return await self._on_timeout(msg_id, collector, timeout)
        watchdog = status == "memory"
        if watchdog:
            await self._kill()
        kind, cause = self._death_cause(oom_before, watchdog)
        note = await self._restart_note()
        collector.add_error(f"KernelDied: {cause}. {note}")
        return self._outcome(collector, kind, state_lost=True)

    async def _collect(self, msg_id: str, collector: OutputCollector, deadline: float) -> str:
        """Feed iopub messages of ``msg_id`` to ``collector``; return idle, timeout, dead or memory."""
        assert self._kc is not None
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
                if self._over_memory():
                    return "memory"
            try:
                msg = await self._kc.get_iopub_msg(timeout=min(deadline - now, _POLL))
            except queue.Empty:
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            msg_type = msg["header"]["msg_type"]
            if msg_type == "status":
                if msg["content"].get("execution_state") == "idle":
                    return "idle"
                continue
            collector.feed(msg_type, msg["content"])

    async def _reply_count(self, msg_id: str) -> int | None:
        assert self._kc is not None
        with contextlib.suppress(queue.Empty):
            while True:
                reply = await self._kc.get_shell_msg(timeout=1.0)
                if reply.get("parent_header", {}).get("msg_id") == msg_id:
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
        await self._kill()
        note = await self._restart_note()
        collector.add_error(
            f"TimeoutError: execution exceeded the {limit} s time limit and did not stop when interrupted. {note}"
        )
        return self._outcome(collector, "timeout", state_lost=True)

    def _over_memory(self) -> bool:
        pid = self.pid
        return self._memory_limit is not None and pid is not None and procs.tree_memory_exceeds(pid, self._memory_limit)

    async def _kill(self) -> None:
        process = self._process()
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(process.pid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        deadline = time.monotonic() + 5
        # A Popen offers no awaitable exit, and the kernel manager owns the process: poll it.
        while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def _death_cause(self, oom_before: int | None, watchdog: bool) -> tuple[str, str]:
        """(outcome kind, explanation) for a kernel that is gone."""
        process = self._process()
        code = process.poll() if process is not None else None
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
