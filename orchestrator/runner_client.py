"""The orchestrator's side of the runner protocol (``sandbox-image/runner/PROTOCOL.md``).

A ``RunnerClient`` speaks to one runner over a byte stream: a Unix socket the runner dialled, the
attach stream of a container, or a subprocess's pipes. Everything the runner sends is untrusted,
because user code shares its container and can forge bytes: frames are size-capped, replies are
validated, and a stream that stops making sense is resynchronised or given up, never believed.

The frame format is repeated here rather than imported, because the runner ships in another image;
``tests/contract`` drives the real runner with this client so the two copies cannot drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import struct
from collections.abc import Callable
from typing import Any, Final, Protocol

import pydantic_core
import structlog
from pydantic import BaseModel, Field

from .errors import FileNotFound, InvalidRequest, RequestTooLarge, RunnerFailure
from .wire import dump_json

log = structlog.get_logger(__name__)

PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct(">I")
SYNC_MARKER: Final = b"\x00TCI-SYNC:"
# Key of a progress frame (``{"id", "progress": event, ...}``), routed to the request's listener.
PROGRESS: Final = "progress"

ProgressListener = Callable[[dict[str, Any]], None]

OPS: Final = frozenset(
    {
        "hello",
        "ready",
        "execute",
        "interrupt",
        "stats",
        "list_files",
        "read_file",
        "write_file",
        "delete_file",
        "run",
        "fetch",
    }
)


class RunResult(BaseModel):
    """The result of the ``run`` op (a command as a process), validated: it comes from a sandbox."""

    stdout: str
    stderr: str
    return_code: int | None
    """None when the command was killed at its time limit."""
    execution_time: float = Field(ge=0)
    timed_out: bool
    oom: bool
    dropped_bytes: dict[str, int] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    """Fetched files, path -> base64."""
    memory_limit_bytes: int | None = Field(None, ge=0)
    """The memory limit the run was held to (None: none known)."""


class FetchResult(BaseModel):
    """The result of the ``fetch`` op: files of the working directory, path -> base64."""

    files: dict[str, str]
    dropped_bytes: int = Field(0, ge=0)


class RunnerRefused(Exception):
    """The runner answered ``ok: false``: the request was not carried out (no code ran)."""

    def __init__(self, code: str, message: str, param: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_error(self) -> Exception:
        """The orchestrator error for this refusal."""
        if self.code in {"invalid_file", "file_write_failed", "bad_request"}:
            return InvalidRequest(self.message, param=self.param, code=self.code)
        if self.code == "file_not_found":
            return FileNotFound(self.message, param=self.param)
        if self.code == "file_too_large":
            return RequestTooLarge(self.message, param=self.param, code=self.code)
        return RunnerFailure(f"runner refused the request: {self.message}")


class StreamSink(Protocol):
    """Where a client writes its frames: an ``asyncio.StreamWriter`` or a backend's own adapter."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


def encode_frame(message: dict[str, Any]) -> bytes:
    """One length-prefixed JSON frame."""
    body = dump_json(message)
    return HEADER.pack(len(body)) + body


async def close_stream(writer: StreamSink, timeout: float = 1.0) -> None:
    """Close ``writer``; a socket's is waited for until its transport is let go (aborted after ``timeout``).

    ``close()`` alone finishes on a later turn of the loop: one that shuts down first (an app's
    lifespan ending) would leave the socket to the garbage collector.
    """
    with contextlib.suppress(Exception):
        writer.close()
        if not isinstance(writer, asyncio.StreamWriter):
            return  # a backend's adapter closes what it wraps itself
        try:
            async with asyncio.timeout(timeout):
                await writer.wait_closed()
        except TimeoutError:
            writer.transport.abort()  # the sandbox stopped reading: nothing more will be flushed


class RunnerClient:
    """Request/response over one runner stream, with a background task routing replies by id."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: StreamSink,
        *,
        max_frame_bytes: int,
        name: str = "runner",
        hang_up_on_failure: bool = False,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_frame = max_frame_bytes
        self._name = name
        # True for a connection the runner dialled; stdio and attach streams are resynchronised instead.
        self._hang_up_on_failure = hang_up_on_failure
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: dict[str, ProgressListener] = {}
        self._write_lock = asyncio.Lock()
        self._pump: asyncio.Task[None] | None = None
        self._closed: BaseException | None = None
        # Ids unique to this client: after a reattach, replies to an earlier client's requests are
        # still in the stream (an execute it sent may still be running) and must match nothing here.
        self._id_prefix = secrets.token_hex(4)
        self._ids = 0
        self._on_close: list[Callable[[], object]] = []

    @property
    def closed(self) -> bool:
        """Whether the stream has failed or been closed; a new client must be opened."""
        return self._closed is not None

    async def connect(self, timeout: float) -> dict[str, Any]:
        """Say hello, find the frame boundary after our nonce, and start routing replies.

        Returns:
            The runner's ``hello`` result (protocol version, counters, kernel state).

        Raises:
            RunnerFailure: no sync marker within ``timeout``, or an incompatible runner.
        """
        nonce = secrets.token_hex(16)
        marker = SYNC_MARKER + nonce.encode() + b"\n"
        request_id = self._next_id()
        try:
            async with asyncio.timeout(timeout):
                await self._write({"id": request_id, "op": "hello", "args": {"nonce": nonce}})
                # Whatever precedes our marker is the tail of an older conversation: skip it.
                await self._reader.readuntil(marker)
                reply = await self._read_frame()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            self._fail(exc)
            raise RunnerFailure(f"{self._name}: no answer to hello ({type(exc).__name__})") from exc
        except RunnerFailure as exc:
            self._fail(exc)
            raise
        result = self._unwrap(reply, request_id)
        if result.get("protocol") != PROTOCOL_VERSION:
            self._fail(RunnerFailure("protocol mismatch"))
            raise RunnerFailure(f"{self._name}: runner speaks protocol {result.get('protocol')!r}")
        self._pump = asyncio.create_task(self._route(), name=f"{self._name}-replies")
        return result

    async def request(
        self, op: str, args: dict[str, Any], timeout: float, on_progress: ProgressListener | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its reply; ``on_progress`` gets its progress frames (unvalidated).

        Raises:
            RunnerRefused: the runner declined (``ok: false``).
            RunnerFailure: the stream broke, or no reply came within ``timeout``.
        """
        if self._closed is not None:
            raise RunnerFailure(f"{self._name}: connection is closed")
        request_id = self._next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if on_progress is not None:
            self._listeners[request_id] = on_progress
        try:
            await self._write({"id": request_id, "op": op, "args": args})
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(future)
        except TimeoutError as exc:
            raise RunnerFailure(f"{self._name}: no reply to {op} within {timeout:g} s") from exc
        except OSError as exc:
            self._fail(exc)
            raise RunnerFailure(f"{self._name}: stream failed: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
            self._listeners.pop(request_id, None)
        return self._unwrap(reply, request_id)

    def on_close(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when this client is closed (transport plumbing owned by the backend)."""
        self._on_close.append(callback)

    async def close(self) -> None:
        """Stop routing and close the stream; pending requests fail."""
        self._fail(RunnerFailure("closed"))
        for callback in self._on_close:
            callback()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        await close_stream(self._writer)

    def _next_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}-{self._ids}"

    async def _write(self, message: dict[str, Any]) -> None:
        async with self._write_lock:
            self._writer.write(encode_frame(message))
            await self._writer.drain()

    async def _read_frame(self) -> dict[str, Any]:
        header = await self._reader.readexactly(HEADER.size)
        (length,) = HEADER.unpack(header)
        if length > self._max_frame:
            raise RunnerFailure(f"{self._name}: frame of {length} bytes exceeds the {self._max_frame}-byte cap")
        body = await self._reader.readexactly(length)
        try:
            message = pydantic_core.from_json(body, allow_inf_nan=False)
        except ValueError:
            # Rare, so parsed slowly: NaN or Infinity (not JSON, but a display may hold them) become
            # null, and invalid UTF-8 (only a forged frame has any) is replaced.
            try:
                message = json.loads(body.decode("utf-8", errors="replace"), parse_constant=lambda _: None)
            except json.JSONDecodeError as exc:
                raise RunnerFailure(f"{self._name}: frame is not JSON") from exc
        if not isinstance(message, dict):
            raise RunnerFailure(f"{self._name}: frame is not an object")
        return message

    async def _route(self) -> None:
        try:
            while True:
                message = await self._read_frame()
                if PROGRESS in message and "ok" not in message:
                    listener = self._listeners.get(str(message.get("id")))
                    if listener is not None:
                        try:
                            listener(message)
                        except Exception as exc:  # noqa: BLE001 - a listener's bug must not end the stream
                            log.warning("progress_listener_failed", runner=self._name, error=repr(exc))
                    continue
                future = self._pending.get(str(message.get("id")))
                if future is not None and not future.done():
                    future.set_result(message)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any failure ends the stream for every waiter
            log.warning("runner_stream_failed", runner=self._name, error=f"{type(exc).__name__}: {exc}")
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
            if self._hang_up_on_failure:
                # The runner sees the end and dials again, which is what the next connect() waits for.
                with contextlib.suppress(Exception):
                    self._writer.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RunnerFailure(f"{self._name}: stream ended ({type(exc).__name__})"))

    def _unwrap(self, reply: dict[str, Any], request_id: str) -> dict[str, Any]:
        if reply.get("id") != request_id:
            raise RunnerFailure(f"{self._name}: reply for the wrong request")
        result = reply.get("result")
        if reply.get("ok") is True and isinstance(result, dict):
            return result
        error = reply.get("error")
        if reply.get("ok") is False and isinstance(error, dict):
            param = error.get("param")
            raise RunnerRefused(
                str(error.get("code", "runner_error"))[:64],
                str(error.get("message", ""))[:2000],
                str(param)[:200] if param is not None else None,
            )
        raise RunnerFailure(f"{self._name}: malformed reply")
