"""The runner's request loop: frames in and out over stdin/stdout, or over a socket it dials."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, process, procs, workspace
from . import relay as index_relay
from .config import RunnerConfig
from .files import FileRejected, check_destinations, prepare_files, write_files
from .kernel import KernelSupervisor
from .launch import LaunchedKernel
from .protocol import (
    OPS,
    PROTOCOL_VERSION,
    ProtocolError,
    encode_frame,
    fail,
    ok,
    progress,
    read_frame,
    sync_line,
)
from .workspace import WorkspaceRefused

log = logging.getLogger("sandbox_runner")

# How long an execute waits for a kernel that is still booting before starting one itself.
_BOOT_WAIT = 60.0

# Executes are bounded by the orchestrator; this only guards against a missing or absurd value.
_MAX_TIMEOUT = 24 * 3600.0

# Redial backoff while the orchestrator's socket is absent or refuses (it is restarting).
_REDIAL_FIRST = 0.005
_REDIAL_MAX = 0.5


def _timeout_arg(args: dict[str, Any], default: float) -> float | None:
    """The request's ``timeout`` in seconds, or None when it is not a positive number of sane size."""
    value = args.get("timeout", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= _MAX_TIMEOUT:
        return None
    return float(value)


class Runner:
    """Dispatches protocol requests to the kernel supervisor and keeps the session counters."""

    def __init__(self, config: RunnerConfig, supervisor: KernelSupervisor) -> None:
        self._config = config
        self._kernel = supervisor
        self._writer: asyncio.StreamWriter | None = None
        self._write_lock = asyncio.Lock()
        # One execute at a time.
        self._exec_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        # Whether an ``interrupt`` request arrived while the current execute's code was running.
        self._running = False
        self._interrupt_requested = False
        self.started_at = time.time()
        self.execute_count = 0
        self.last_execute_at: float | None = None
        self.kernel_error: str | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read requests until the stream ends; each request is handled in its own task.

        Replies always go to the newest stream: an execute still running when its stream broke
        answers on the next one, where the client ignores the id it does not know.
        """
        self._writer = writer
        while True:
            try:
                message = await read_frame(reader)
            except (EOFError, OSError) as exc:
                # A killed orchestrator resets the stream (ECONNRESET) rather than ending it when
                # it dies with a reply unread: that is an end of stream too, never the runner's.
                log.info("request stream closed: %r", exc)
                return
            except ProtocolError as exc:
                # Without a frame boundary the rest of the stream is meaningless.
                log.error("unreadable request stream: %s", exc)
                return
            task = asyncio.create_task(self._handle(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, message: dict[str, Any], prefix: bytes = b"") -> None:
        async with self._write_lock:
            writer = self._writer
            if writer is None or writer.is_closing():
                log.warning("no stream to send reply %s on; dropped", message.get("id"))
                return
            try:
                writer.write(prefix + encode_frame(message))
                await writer.drain()
            except OSError as exc:
                log.warning("reply %s lost: %s", message.get("id"), exc)

    def _send_nowait(self, message: dict[str, Any]) -> None:
        """Queue a progress frame without waiting; one write keeps it whole, and the reply follows it."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode_frame(message))

    def _send_output(self, request_id: str, item: dict[str, Any]) -> None:
        self._send_nowait(progress(request_id, "output", output=item))

    async def _handle(self, message: dict[str, Any]) -> None:
        request_id = str(message.get("id", ""))
        op = message.get("op")
        args = message.get("args") or {}
        if op not in OPS or not isinstance(args, dict):
            await self._send(fail(request_id, "bad_request", f"unknown op {op!r}"))
            return
        try:
            match op:
                case "hello":
                    nonce = str(args.get("nonce", ""))
                    await self._send(ok(request_id, self._hello()), prefix=sync_line(nonce))
                case "ready":
                    await self._send(await self._ready(request_id, args))
                case "execute":
                    await self._execute(request_id, args)
                case "interrupt":
                    self._interrupt_requested = self._running
                    await self._kernel.interrupt_cell(lambda: self._running)
                    await self._send(ok(request_id, {"interrupted": self._running}))
                case "stats":
                    await self._send(ok(request_id, self._stats()))
                case "list_files" | "read_file" | "write_file" | "delete_file":
                    await self._send(await self._file_op(request_id, op, args))
                case "run" | "fetch":
                    # Under the execute lock: an execute's leftover sweep would kill the process.
                    async with self._exec_lock:
                        if op == "fetch":
                            await self._send(process.fetch(request_id, args, self._config))
                        else:
                            keep = {self._kernel.pid} if self._kernel.pid else set()
                            await self._send(await process.run(request_id, args, self._config, keep))
        except Exception as exc:
            log.exception("request %s (%s) failed", request_id, op)
            await self._send(fail(request_id, "runner_error", f"{type(exc).__name__}: {exc}"))

    async def _file_op(self, request_id: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The file ops; they run beside an execute (in a thread), never queued behind it."""
        root, limits, path = self._config.workdir, self._config.limits, args.get("path")
        try:
            match op:
                case "list_files":
                    result = await asyncio.to_thread(workspace.list_dir, root, path, limits)
                case "read_file":
                    offset, length, most = (args.get(k) for k in ("offset", "length", "max_bytes"))
                    if not all(type(v) is int and v >= 0 for v in (offset, length, most)):
                        return fail(request_id, "bad_request", "offset, length and max_bytes must be integers >= 0")
                    assert isinstance(offset, int)
                    assert isinstance(length, int)
                    assert isinstance(most, int)
                    result = await asyncio.to_thread(workspace.read_chunk, root, path, limits, offset, length, most)
                case "write_file":
                    result = await asyncio.to_thread(workspace.write_file, root, path, args.get("content"), limits)
                case _:
                    result = await asyncio.to_thread(workspace.delete, root, path, limits)
        except WorkspaceRefused as exc:
            return fail(request_id, exc.code, str(exc), exc.param)
        except OSError as exc:
            return fail(request_id, "file_write_failed", f"{op} failed: {exc.strerror or exc}", "path")
        return ok(request_id, result)

    def _hello(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "version": __version__, **self._stats()}

    def _stats(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "execute_count": self.execute_count,
            "last_execute_at": self.last_execute_at,
            "kernel_ready": self._kernel.ready.is_set(),
            "kernel_error": self.kernel_error,
            "kernel_pid": self._kernel.pid,
            "kernel_restarts": self._kernel.restarts,
            "kernel_startup_seconds": self._kernel.startup_seconds,
            "memory_bytes": procs.cgroup_memory_usage(),
            "memory_limit_bytes": procs.cgroup_memory_limit(),
        }

    async def _ready(self, request_id: str, args: dict[str, Any]) -> dict[str, Any]:
        timeout = _timeout_arg(args, 60)
        if timeout is None:
            return fail(request_id, "bad_request", "timeout must be a positive number", "timeout")
        try:
            await asyncio.wait_for(self._kernel.ready.wait(), timeout)
        except TimeoutError:
            reason = self.kernel_error or f"the kernel was not ready within {timeout:g} s"
            return fail(request_id, "kernel_not_ready", reason)
        return ok(request_id, self._stats())

    async def _kernel_ready(self) -> bool:
        """Wait for a kernel that is starting; start one again if it failed (never wait forever)."""
        if self._kernel.ready.is_set():
            return True
        if self.kernel_error is None and self._kernel.start_error is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kernel.ready.wait(), _BOOT_WAIT)
        return self._kernel.ready.is_set() or await self._kernel.restart()

    async def _execute(self, request_id: str, args: dict[str, Any]) -> None:
        code = args.get("code")
        if not isinstance(code, str):
            await self._send(fail(request_id, "bad_request", "code must be a string", "code"))
            return
        timeout = _timeout_arg(args, 30)
        if timeout is None:
            await self._send(fail(request_id, "bad_request", "timeout must be a positive number", "timeout"))
            return
        async with self._exec_lock:
            try:
                files = prepare_files(args.get("files"), self._config.limits)
                if files:
                    check_destinations(self._config.workdir, files)
                    write_files(self._config.workdir, files)
            except FileRejected as exc:
                await self._send(fail(request_id, "invalid_file", str(exc), exc.param))
                return
            except OSError as exc:
                await self._send(fail(request_id, "file_write_failed", f"could not write the files: {exc}", "files"))
                return
            if not await self._kernel_ready():
                reason = self._kernel.start_error or self.kernel_error or "the kernel is not running"
                await self._send(fail(request_id, "kernel_not_ready", reason))
                return
            on_output = None
            if args.get("stream") is True:
                self._send_nowait(progress(request_id, "started"))
                on_output = functools.partial(self._send_output, request_id)
            self._running, self._interrupt_requested = True, False
            try:
                outcome = await self._kernel.execute(code, timeout, on_output)
            finally:
                self._running = False
            # The KeyboardInterrupt of our own SIGINT, not one the code raised or a timeout's.
            summary = outcome.error_summary or ""
            if self._interrupt_requested and outcome.outcome == "error" and summary.startswith("KeyboardInterrupt"):
                outcome.outcome = "interrupted"
            if outcome.outcome != "not_run":
                self.execute_count += 1
                self.last_execute_at = time.time()
            await self._send(ok(request_id, outcome.to_wire()))
            self._kernel.settle()


async def open_stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Async streams over this process's stdin and stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def dial(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the orchestrator's socket, retrying with backoff until it listens."""
    delay = _REDIAL_FIRST
    while True:
        try:
            return await asyncio.open_unix_connection(str(path), limit=2**20)
        except OSError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _REDIAL_MAX)


async def serve_socket(runner: Runner, path: Path) -> None:
    """Dial out, serve, and dial again whenever the stream ends (an orchestrator restart)."""
    while True:
        reader, writer = await dial(path)
        log.info("connected to %s", path)
        try:
            await runner.serve(reader, writer)
        finally:
            writer.close()


async def run(config: RunnerConfig, kernel_env: dict[str, str], launched: LaunchedKernel | None = None) -> None:
    """Wait for the kernel in the background (``launched``, or one started here); serve meanwhile.

    On stdio the runner exits when stdin ends; on a socket it dials again, for ever.
    """
    supervisor = KernelSupervisor(config, kernel_env, launched)
    runner = Runner(config, supervisor)

    async def start_kernel() -> None:
        for attempt in range(1, 4):
            try:
                await supervisor.start()
                log.info("kernel ready in %.3f s", supervisor.startup_seconds or 0.0)
                return
            except Exception as exc:
                runner.kernel_error = f"the kernel failed to start: {type(exc).__name__}: {exc}"
                log.exception("kernel start attempt %d failed", attempt)

    starter = asyncio.create_task(start_kernel())
    relay = None
    if config.index_socket is not None:
        try:
            relay = await index_relay.serve(config.index_port, config.index_socket)
        except OSError:
            log.exception("the package-index relay did not start; pip installs will fail")
    main = asyncio.current_task()
    if main is not None:
        # A stop (docker stop, a test's terminate) shuts the kernel down and removes its files.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    try:
        if config.socket is not None:
            await serve_socket(runner, config.socket)
        else:
            await runner.serve(*await open_stdio())
    finally:
        if relay is not None:
            relay.close()
        starter.cancel()
        # A kernel still starting cleans up after itself; let it finish doing so.
        with contextlib.suppress(asyncio.CancelledError):
            await starter
        await supervisor.shutdown()
