"""Every bad request gets the documented error envelope, and nothing runs.

Each request carries code with visible effects (``canary``: it creates a file on this host and
bumps ``counter`` in the victim session); after the request, the file must not exist, no session
or sandbox may have appeared, and the victim session's counter and execute count are unchanged.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import KEY_A, KEY_B, App, auth, canary, check_error, make_settings, stdout_of
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends.local import LocalBackend

MiB = 1024 * 1024


class NothingRan:
    """Snapshot before a bad request; ``check()`` proves afterwards that nothing ran."""

    def __init__(self, app: App, victim: str, marker: Path) -> None:
        self.app = app
        self.victim = victim
        self.marker = marker
        self.code = canary(marker)
        self.before = app.snapshot()

    def check(self) -> None:
        assert not self.marker.exists(), "the request's code ran"
        assert self.app.snapshot() == self.before
        state = self.app.execute(KEY_A, "print(counter, os.path.exists('ok.txt'))", self.victim)
        assert stdout_of(state) == "0 False\n"


@pytest.fixture
def nothing_ran(app: App, victim: str, tmp_path: Path) -> NothingRan:
    return NothingRan(app, victim, tmp_path / "ran")


def post_raw(app: App, content: Any, headers: dict[str, str] | None = None) -> Any:
    return app.client.post(
        "/tci/execute", content=content, headers={**auth(KEY_A), "content-type": "application/json", **(headers or {})}
    )


def test_malformed_json_is_400(app: App, victim: str, nothing_ran: NothingRan) -> None:
    text = json.dumps({"code": nothing_ran.code, "language": "python", "session_id": victim})
    check_error(post_raw(app, text[:-1]), 400, "invalid_json")
    check_error(post_raw(app, text + "}"), 400, "invalid_json")
    nothing_ran.check()


@pytest.mark.parametrize("escape", ["\\ud800", "\\udc80x", "\\ud800\\ud800"], ids=["high", "low", "two-high"])
def test_a_lone_surrogate_is_400_and_named(app: App, victim: str, nothing_ran: NothingRan, escape: str) -> None:
    # What json.dumps writes for a str holding a surrogate (a filename decoded with surrogateescape).
    text = json.dumps({"code": nothing_ran.code + "#", "language": "python", "session_id": victim})
    response = post_raw(app, text.replace('#"', escape + '"', 1))
    check_error(response, 400, "invalid_json")
    assert "surrogate pair" in response.json()["error"]["message"]
    nothing_ran.check()


@pytest.mark.parametrize(
    ("make_body", "param"),
    [
        pytest.param(lambda code, sid: {"language": "python", "session_id": sid}, "code", id="missing-code"),
        pytest.param(lambda code, sid: {"code": 123, "session_id": sid}, "code", id="code-int"),
        pytest.param(lambda code, sid: {"code": None, "session_id": sid}, "code", id="code-null"),
        pytest.param(lambda code, sid: {"code": code, "session_id": sid, "files": "abc"}, "files", id="files-str"),
        pytest.param(
            lambda code, sid: {"code": code, "session_id": sid, "files": [{"name": "ok.txt", "content": "x"}]},
            "files.0.encoding",
            id="file-no-encoding",
        ),
        pytest.param(
            lambda code, sid: {
                "code": code,
                "session_id": sid,
                "files": [{"name": "ok.txt", "encoding": "zip", "content": "x"}],
            },
            "files.0.encoding",
            id="file-encoding-zip",
        ),
        pytest.param(
            lambda code, sid: {
                "code": code,
                "session_id": sid,
                "files": [{"name": "ok.txt", "encoding": "string", "content": 5}],
            },
            "files.0.content",
            id="file-content-int",
        ),
        pytest.param(lambda code, sid: {"code": code, "session_id": 7}, "session_id", id="session-id-int"),
        pytest.param(lambda code, sid: [code], None, id="body-is-a-list"),
    ],
)
def test_wrong_shape_is_422(app: App, victim: str, nothing_ran: NothingRan, make_body: Any, param: str | None) -> None:
    response = app.client.post("/tci/execute", json=make_body(nothing_ran.code, victim), headers=auth(KEY_A))
    check_error(response, 422, "invalid_request", param=param)
    nothing_ran.check()


@pytest.mark.parametrize("language", ["r", "R", "javascript", ""])
@pytest.mark.parametrize("in_session", [True, False], ids=["existing-session", "new-session"])
def test_unsupported_language(app: App, victim: str, nothing_ran: NothingRan, language: str, in_session: bool) -> None:
    body: dict[str, Any] = {"code": nothing_ran.code, "language": language}
    if in_session:
        body["session_id"] = victim
    response = app.client.post("/tci/execute", json=body, headers=auth(KEY_A))
    assert 400 <= response.status_code < 500
    check_error(response, response.status_code, "unsupported_language", param="language")
    nothing_ran.check()


def _big_body(code: str, victim: str) -> bytes:
    padding = "#" * (20 * MiB)
    return json.dumps({"code": code + padding, "language": "python", "session_id": victim}).encode()


def test_20_mb_body_with_content_length_is_413(app: App, victim: str, nothing_ran: NothingRan) -> None:
    body = _big_body(nothing_ran.code, victim)
    check_error(post_raw(app, body), 413, "request_too_large")
    nothing_ran.check()


def test_20_mb_body_streamed_without_length_is_413(app: App, victim: str, nothing_ran: NothingRan) -> None:
    body = _big_body(nothing_ran.code, victim)
    sent = {"chunks": 0}

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), MiB):
            sent["chunks"] += 1
            yield body[start : start + MiB]

    # A generator body goes out chunked: no Content-Length for the server to check up front.
    check_error(post_raw(app, chunks()), 413, "request_too_large")
    assert sent["chunks"] >= 1
    nothing_ran.check()


def test_unknown_and_foreign_sessions_are_the_same_404(app: App, victim: str, nothing_ran: NothingRan) -> None:
    def attempt(key: str, session_id: Any) -> dict[str, Any]:
        body = {"code": nothing_ran.code, "language": "python", "session_id": session_id}
        response = app.client.post("/tci/execute", json=body, headers=auth(key))
        envelope = check_error(response, 404, "session_not_found", param="session_id")
        # The message names the id the caller sent; apart from that, the bodies must be identical.
        anonymised: dict[str, Any] = json.loads(json.dumps(envelope).replace(session_id, "<id>"))
        return anonymised

    made_up = attempt(KEY_A, "ses_" + "Z" * 22)
    foreign = attempt(KEY_B, victim)
    malformed = attempt(KEY_A, "../../etc/passwd")
    assert made_up == foreign == malformed
    assert made_up["error"]["message"] == "Session '<id>' not found or expired"
    # An empty id is named too (the message read "Session  not found").
    empty = app.client.post("/tci/execute", json={"code": nothing_ran.code, "session_id": ""}, headers=auth(KEY_A))
    assert check_error(empty, 404, "session_not_found")["error"]["message"] == "Session '' not found or expired"
    nothing_ran.check()


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/../../x", "./../x"])
@pytest.mark.parametrize("in_session", [True, False], ids=["existing-session", "new-session"])
def test_traversal_file_name_is_400(
    app: App, victim: str, nothing_ran: NothingRan, name: str, in_session: bool
) -> None:
    files = [
        # A valid file first: the request is all-or-nothing, so it must not be written either.
        {"name": "ok.txt", "encoding": "string", "content": "fine"},
        {"name": name, "encoding": "string", "content": "escaped"},
    ]
    body: dict[str, Any] = {"code": nothing_ran.code, "language": "python", "files": files}
    if in_session:
        body["session_id"] = victim
    response = app.client.post("/tci/execute", json=body, headers=auth(KEY_A))
    check_error(response, 400, "invalid_file", param="files[1].name")
    nothing_ran.check()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}],
    ids=["none", "basic", "bearer-empty", "bearer-only"],
)
def test_missing_api_key_is_401(app: App, victim: str, nothing_ran: NothingRan, headers: dict[str, str]) -> None:
    body = {"code": nothing_ran.code, "language": "python"}
    check_error(app.client.post("/tci/execute", json=body, headers=headers), 401, "invalid_api_key")
    check_error(
        app.client.post("/v1/tci/execute", json={**body, "session_id": victim}, headers=headers), 401, "invalid_api_key"
    )
    check_error(app.client.get("/tci/sessions", headers=headers), 401, "invalid_api_key")
    nothing_ran.check()


def test_unknown_route_uses_the_envelope(app: App) -> None:
    check_error(app.client.get("/tci/nope", headers=auth(KEY_A)), 404, "not_found")
    response = app.client.get("/tci/execute", headers=auth(KEY_A))
    check_error(response, 405, "http_error")
    assert response.headers["allow"] == "POST"  # RFC 9110: a 405 says what is allowed


def test_an_unexpected_failure_of_an_execute_is_a_500_envelope_with_a_request_id() -> None:
    # Executes are served ahead of FastAPI's own layers (app.py): they must still end in the one handler.
    settings = make_settings()

    class BrokenBackend(LocalBackend):
        async def create(self, claim: Any) -> Any:
            raise RuntimeError("a bug, not an OrchestratorError")

    with TestClient(create_app(settings, backend=BrokenBackend(settings)), raise_server_exceptions=False) as client:
        response = client.post("/v1//tci/execute", json={"code": "1"}, headers=auth(KEY_A))
        body = check_error(response, 500, "internal_error")
        assert body["error"]["message"] == "internal error"
        assert response.headers["x-should-retry"] == "false"
        assert len(response.headers["x-request-id"]) == 16


def test_executes_carry_a_request_id(app: App) -> None:
    ok = app.client.post("/tci/execute", json={"code": "1"}, headers=auth(KEY_A))
    refused = app.client.post("/tci/execute", json={"code": "1"})
    assert ok.status_code == 200
    check_error(refused, 401, "invalid_api_key")
    ids = {response.headers["x-request-id"] for response in (ok, refused)}
    assert len(ids) == 2
    assert all(len(value) == 16 for value in ids)


def test_a_new_session_that_waits_too_long_for_its_turn_gets_429_and_nothing_runs(tmp_path: Path) -> None:
    settings = make_settings(max_concurrent_creates=1, create_wait_seconds=0.5)
    gate, entered = threading.Event(), threading.Event()

    class HeldBackend(LocalBackend):
        """Its first create waits for the test, so the next new session finds no free turn."""

        async def create(self, claim: Any) -> Any:
            if not entered.is_set():
                entered.set()
                await asyncio.to_thread(gate.wait, 30)
            return await super().create(claim)

    backend = HeldBackend(settings)
    with TestClient(create_app(settings, backend=backend)) as client:
        first: dict[str, Any] = {}
        held = threading.Thread(
            target=lambda: first.update(r=client.post("/tci/execute", json={"code": "1"}, headers=auth(KEY_A)))
        )
        held.start()
        assert entered.wait(30), "the first new session never reached its create"
        marker = tmp_path / "ran"
        try:
            refused = client.post(
                "/tci/execute", json={"code": f"open({str(marker)!r}, 'w').close()"}, headers=auth(KEY_B)
            )
        finally:
            gate.set()
            held.join(60)
        check_error(refused, 429, "rate_limit_exceeded", None)
        assert refused.headers["retry-after"] == "5"
        assert refused.headers["x-should-retry"] == "true"
        assert not marker.exists()
        assert first["r"].status_code == 200, first["r"].text


def test_a_missing_language_is_named_as_missing(app: App) -> None:
    """Not "language {whole body} is not supported": the field is absent, and that is what is said."""
    response = app.client.post("/run_code", json={"code": "print(1)"}, headers=auth(KEY_A))
    check_error(response, 422, "invalid_request", param="language")
    assert response.json()["error"]["message"] == "language: Field required"
