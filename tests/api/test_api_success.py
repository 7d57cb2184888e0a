"""Success shapes, every path the SDKs use, and the operational endpoints."""

from __future__ import annotations

from datetime import datetime

import pytest
from api_support import KEY_A, KEY_B, App, auth, check_error, stdout_of

KEY_PATHS = "api-tests-paths"


# Absolute URLs: httpx would read a bare "//tci/..." as a network-path reference to host "tci".
@pytest.mark.parametrize(
    "path",
    [
        "http://testserver/tci/execute",
        "http://testserver/v1/tci/execute",
        "http://testserver/v1//tci/execute",  # 1.x SDK, base URL ending in /v1
        "http://testserver//tci/execute",  # 1.x SDK, bare base URL
    ],
)
def test_execute_on_every_sdk_path(app: App, path: str) -> None:
    data = app.execute(KEY_PATHS, "print('hi')", path=path)
    assert data["outputs"] == [{"type": "stdout", "data": "hi\n"}]
    assert data["errors"] is None
    again = app.execute(KEY_PATHS, "print('again')", data["session_id"], path=path)
    assert again["session_id"] == data["session_id"]
    assert stdout_of(again) == "again\n"


@pytest.mark.parametrize("path", ["/tci/sessions", "/v1/tci/sessions", "/v1//tci/sessions"])
def test_sessions_on_every_sdk_path(app: App, path: str) -> None:
    session_id = app.execute(KEY_B, "pass")["session_id"]
    assert session_id in [s["id"] for s in app.sessions(KEY_B, path=path)]


def test_session_list_timestamps_and_counts(app: App) -> None:
    key = "api-tests-list"
    assert app.sessions(key) == []
    session_id = app.execute(key, "x = 1")["session_id"]
    (first,) = app.sessions(key)
    assert first["id"] == session_id
    assert first["execute_count"] == 1
    app.execute(key, "x += 1", session_id)
    (second,) = app.sessions(key)
    assert second["execute_count"] == 2
    started, last, expires = (
        datetime.fromisoformat(second[k]) for k in ("started_at", "last_execute_at", "expires_at")
    )
    assert started.tzinfo is not None
    assert started <= last < expires
    assert second["last_execute_at"] >= first["last_execute_at"]
    assert second["started_at"] == first["started_at"]
    # Other tenants see nothing of it.
    assert session_id not in [s["id"] for s in app.sessions(KEY_A)]


def test_error_output_is_still_success(app: App) -> None:
    data = app.execute(KEY_PATHS, "print('before')\n1/0")
    assert [o["type"] for o in data["outputs"]] == ["stdout", "error"]
    assert "ZeroDivisionError" in data["outputs"][1]["data"]
    assert isinstance(data["errors"], str)
    assert "ZeroDivisionError" in data["errors"]


def test_execute_result_is_a_mime_bundle(app: App) -> None:
    data = app.execute(KEY_PATHS, "6 * 7")
    assert data["outputs"] == [{"type": "execute_result", "data": {"text/plain": "42"}}]


def test_uploaded_files_are_written_before_the_code_runs(app: App) -> None:
    files = [
        {"name": "data.txt", "encoding": "string", "content": "hello"},
        {"name": "sub/dir/bytes.bin", "encoding": "base64", "content": "AAEC"},
    ]
    code = "print(open('data.txt').read(), list(open('sub/dir/bytes.bin', 'rb').read()))"
    data = app.execute(KEY_PATHS, code, files=files)
    assert stdout_of(data) == "hello [0, 1, 2]\n"


def test_delete_extension_ends_a_session(app: App) -> None:
    key = "api-tests-delete"
    session_id = app.execute(key, "pass")["session_id"]
    before = len(app.sandboxes())
    check_error(app.client.delete(f"/tci/sessions/{session_id}", headers=auth(KEY_A)), 404, "session_not_found")
    response = app.client.delete(f"/v1/tci/sessions/{session_id}", headers=auth(key))
    assert response.status_code == 204
    assert app.sessions(key) == []
    assert len(app.sandboxes()) == before - 1
    body = {"code": "pass", "session_id": session_id}
    check_error(app.client.post("/tci/execute", json=body, headers=auth(key)), 404, "session_not_found")


def test_docs_and_openapi(app: App) -> None:
    docs = app.client.get("/docs")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    spec = app.client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/tci/execute", "/v1/tci/execute", "/tci/sessions", "/v1/tci/sessions"):
        assert path in paths


def test_health_readiness_and_metrics(app: App) -> None:
    health = app.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = app.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    app.execute(KEY_PATHS, "pass")
    metrics = app.client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "tci_sessions_active" in metrics.text
    assert 'tci_executions_total{outcome="ok"}' in metrics.text


def test_nan_and_lone_surrogates_in_outputs_still_make_valid_json(app: App) -> None:
    code = "from IPython.display import JSON, display\ndisplay(JSON({'x': float('nan')}))\nprint('a\\ud800b')"
    data = app.execute(KEY_A, code)
    (display,) = [o for o in data["outputs"] if o["type"] == "display_data"]
    assert display["data"]["application/json"] == {"x": None}
    assert stdout_of(data) == "a?b\n"
