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

import structlog
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message

from ..errors import OrchestratorError
from ..models import ExecuteResult
from ..schemas import render_error, render_execute

log = structlog.get_logger(__name__)

MEDIA_TYPE: Final = "text/event-stream"
SESSION_HEADER: Final = "x-session-id"
# Interrupts sent for abandoned streams, kept referenced until they finish.
_ABANDONED: set[asyncio.Task[Any]] = set()


def wants_stream(accept: str | None) -> bool:
    """Whether the ``Accept`` header asks for server-sent events, and prefers them to JSON (pure).

    Quality values count as in RFC 9110: ``text/event-stream;q=0`` refuses a stream, and a stream
    ranked below ``application/json`` is not chosen.
    """
    if accept is None or MEDIA_TYPE not in accept.lower():
        return False
    ranks = {MEDIA_TYPE: 0.0, "application/json": 0.0}
    for item in accept.lower().split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media not in ranks:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        ranks[media] = max(ranks[media], quality)
    return ranks[MEDIA_TYPE] > 0 and ranks[MEDIA_TYPE] >= ranks["application/json"]


def _event(name: str, data: Any) -> ServerSentEvent:
    # ASCII JSON: one line per event (no raw newline), and encodable even if a forged frame held
    # a lone surrogate.
    return ServerSentEvent(data=json.dumps(data, allow_nan=False, separators=(",", ":")), event=name, sep="\n")


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


async def stream_execute(
    run: Callable[[_Watcher], Coroutine[Any, Any, ExecuteResult]],
    interrupt: Callable[[str], Coroutine[Any, Any, bool]],
    keepalive: float,
) -> EventSourceResponse:
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

    async def events() -> AsyncIterator[ServerSentEvent]:
        while (item := await watcher.items.get()) is not None:
            yield _event("output", item)
        try:
            result = task.result()
        except OrchestratorError as exc:
            # Not expected once code runs (the session layer answers with outputs), but never a 5xx.
            yield _event("error", render_error(exc.status_code, exc.message, exc.type, exc.code, exc.param))
            return
        yield _event("result", render_execute(result))

    async def abandon(_: Message) -> None:
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

    headers = {SESSION_HEADER: watcher.session_id} if watcher.session_id is not None else {}
    # sse-starlette sends the keep-alive comments and notices a client that leaves, even mid-silence.
    return EventSourceResponse(
        events(), headers=headers, ping=keepalive, sep="\n", client_close_handler_callable=abandon
    )
