"""Which requests get server-sent events: content negotiation on the ``Accept`` header."""

from __future__ import annotations

import pytest

from orchestrator.api.stream import wants_stream


@pytest.mark.parametrize(
    ("accept", "streams"),
    [
        (None, False),
        ("application/json", False),
        ("*/*", False),
        ("text/event-stream", True),
        ("TEXT/EVENT-STREAM", True),
        ("application/json, text/event-stream", True),
        ("text/event-stream;q=0, application/json", False),
        ("text/event-stream; q=0.0", False),
        ("text/event-stream;q=0.5, application/json", False),
        ("text/event-stream;q=0.9, application/json;q=0.5", True),
        ("text/event-stream;q=nonsense", False),
        ("text/event-stream;charset=utf-8", True),
    ],
)
def test_a_stream_is_sent_when_the_client_prefers_one(accept: str | None, streams: bool) -> None:
    assert wants_stream(accept) is streams
