"""Streaming execute: ``POST /tci/execute`` with ``Accept: text/event-stream``.

The same call as the JSON route, through the same ``SessionManager.execute``; only the delivery
differs. Nothing is sent until the runner says the code is starting, so every refusal before that
(validation, an unknown session, 429, a rejected file) is still a plain JSON error. Then come
``event: output`` (one output item each, as produced), comment lines while the cell is silent, and
one ``event: result`` with exactly the body the JSON route would have returned. A client that
goes away interrupts the execute; the session stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

import anyio
import structlog
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import OrchestratorError
from ..models import ExecuteResult
from ..schemas import render_error, render_execute

log = structlog.get_logger(__name__)

MEDIA_TYPE: Final = "text/event-stream"
SESSION_HEADER: Final = "x-session-id"
# Interrupts sent for abandoned streams, kept referenced until they finish.
_ABANDONED: set[asyncio.Task[Any]] = set()


def wants_stream(accept: str | None) -> bool:
    """Whether the ``Accept`` header asks for server-sent events."""
    return accept is not None and MEDIA_TYPE in accept.lower()


def sse(event: str, data: Any) -> str:
    """One server-sent event; JSON has no raw newlines, so ``data`` is a single line."""
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return f"event: {event}\ndata: {payload}\n\n"


class _Watcher:
    """Collects a streaming execute's progress for the response (an ``ExecuteWatcher``)."""

    def __init__(self) -> None:
        self.begun = asyncio.Event()
        self.session_id: str | None = None
        # None marks the end: the execute task finished (with a result or an error).
        self.items: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def started(self, session_id: str) -> None:
        self.session_id = session_id
        self.begun.set()

    def output(self, item: dict[str, Any]) -> None:
        self.items.put_nowait(item)


class _EventStream(StreamingResponse):
    """A streaming response that notices a client leaving even while nothing is being written."""

    def __init__(self, body: AsyncIterator[str], on_abandon: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(body, media_type=MEDIA_TYPE, headers=headers)
        self._on_abandon = on_abandon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        finished = False
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    nonlocal finished
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                        finished = True
                    group.cancel_scope.cancel()

                async def listen() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(listen)
        finally:
            if not finished:
                self._on_abandon()


async def stream_execute(
    run: Callable[[_Watcher], Coroutine[Any, Any, ExecuteResult]],
    interrupt: Callable[[str], Coroutine[Any, Any, bool]],
    keepalive: float,
) -> StreamingResponse:
    """Start ``run`` and answer once its code starts; raise its error if it fails before that.

    ``interrupt(session_id)`` is called when the client leaves before the result.
    """
    watcher = _Watcher()
    task = asyncio.create_task(run(watcher))
    task.add_done_callback(lambda _: watcher.items.put_nowait(None))
    begun = asyncio.create_task(watcher.begun.wait())
    try:
        await asyncio.wait({task, begun}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        begun.cancel()
    if task.done() and not watcher.begun.is_set():
        task.result()  # an error before the code started is raised as the JSON route raises it

    async def events() -> AsyncIterator[str]:
        while True:
            try:
                item = await asyncio.wait_for(watcher.items.get(), keepalive)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if item is None:
                break
            yield sse("output", item)
        try:
            result = task.result()
        except OrchestratorError as exc:
            # Not expected once code runs (the session layer answers with outputs), but never a 5xx.
            yield sse("error", render_error(exc.status_code, exc.message, exc.type, exc.code, exc.param))
            return
        yield sse("result", render_execute(result))

    def abandon() -> None:
        if task.done() or watcher.session_id is None:
            return
        session_id = watcher.session_id
        log.info("stream_abandoned", session_id=session_id)

        async def stop() -> None:
            with contextlib.suppress(OrchestratorError):
                await interrupt(session_id)

        pending = asyncio.get_running_loop().create_task(stop())
        _ABANDONED.add(pending)
        pending.add_done_callback(_ABANDONED.discard)

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    if watcher.session_id is not None:
        headers[SESSION_HEADER] = watcher.session_id
    return _EventStream(events(), abandon, headers)
