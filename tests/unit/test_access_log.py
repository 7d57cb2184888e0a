"""The access line: one per request, with the status the client got, or why it got none."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from orchestrator.api import middleware


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})


async def _answered(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _client_left(scope: Scope, receive: Receive, send: Send) -> None:
    """What an endpoint does when the client disconnects mid-body: nothing to answer, nothing raised."""


async def _failed(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug")


@pytest.mark.parametrize(("app", "status"), [(_answered, 204), (_client_left, 499), (_failed, 500)])
def test_the_access_line_says_what_the_client_got(monkeypatch: pytest.MonkeyPatch, app: Any, status: int) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(middleware, "log", recorder)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/tci/execute", "headers": []}
    try:
        asyncio.run(middleware.RequestContextMiddleware(app)(scope, receive, send))
    except RuntimeError:
        assert app is _failed
    (line,) = recorder.lines
    assert line["event"] == "request"
    assert line["status"] == status
    if sent:
        headers = dict(sent[0]["headers"])
        assert len(headers[b"x-request-id"]) == 16
