"""Helpers for the in-process API tests (imported by the test modules; ``tests/api`` is on sys.path)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends.local import LocalBackend
from orchestrator.models import SandboxInfo
from orchestrator.schemas import ErrorEnvelope, ExecuteResponse, SessionListResponse
from orchestrator.settings import Settings

KEY_A = "api-tests-tenant-a"
KEY_B = "api-tests-tenant-b"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
SESSION_ID = re.compile(r"^ses_[A-Za-z0-9]{8,64}$")


class Response(Protocol):
    """What the checks read from a response (TestClient's type differs between httpx flavours)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Any: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_settings(**overrides: Any) -> Settings:
    """Local backend, no warm pool, no background reaping unless a test asks for it."""
    values: dict[str, Any] = {
        "backend": "local",
        "pool_size": 0,
        "reaper_interval_seconds": 3600,
        "log_format": "console",
        "execute_timeout_seconds": 20,
    }
    values.update(overrides)
    return Settings(**values)


class App:
    """A running app (lifespan entered) and its backend, which tests may inspect."""

    def __init__(self, client: TestClient, backend: LocalBackend) -> None:
        self.client = client
        self.backend = backend

    def sandboxes(self) -> list[SandboxInfo]:
        """What the backend has running now, read on the app's own event loop."""
        portal = self.client.portal
        assert portal is not None
        return portal.call(self.backend.list)

    def execute(
        self,
        key: str,
        code: str,
        session_id: str | None = None,
        *,
        files: list[dict[str, str]] | None = None,
        path: str = "/tci/execute",
    ) -> dict[str, Any]:
        """A successful execute's ``data``, after checking the body against the schema."""
        body: dict[str, Any] = {"code": code, "language": "python"}
        if session_id is not None:
            body["session_id"] = session_id
        if files is not None:
            body["files"] = files
        response = self.client.post(path, json=body, headers=auth(key))
        assert response.status_code == 200, response.text
        return check_execute_body(response)

    def sessions(self, key: str, path: str = "/tci/sessions") -> list[dict[str, Any]]:
        response = self.client.get(path, headers=auth(key))
        assert response.status_code == 200, response.text
        return check_sessions_body(response)

    def snapshot(self) -> dict[str, Any]:
        """Everything a request that must not run anything could change."""
        return {
            "a": [(s["id"], s["execute_count"], s["last_execute_at"]) for s in self.sessions(KEY_A)],
            "b": [(s["id"], s["execute_count"], s["last_execute_at"]) for s in self.sessions(KEY_B)],
            "sandboxes": sorted(s.sandbox_id for s in self.sandboxes()),
        }


@contextmanager
def running_app(**overrides: Any) -> Iterator[App]:
    settings = make_settings(**overrides)
    backend = LocalBackend(settings)
    with TestClient(create_app(settings, backend=backend)) as client:
        yield App(client, backend)


def stdout_of(data: dict[str, Any]) -> str:
    return "".join(o["data"] for o in data["outputs"] if o["type"] == "stdout")


def check_execute_body(response: Response) -> dict[str, Any]:
    """The body is exactly the documented success shape; returns ``data``."""
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["errors"] is None
    assert body["data"]["status"] == "success"
    assert SESSION_ID.match(body["data"]["session_id"])
    # Nothing beyond the schema, and nothing the schema would render differently.
    assert ExecuteResponse.model_validate(body).model_dump(mode="json") == body
    data: dict[str, Any] = body["data"]
    return data


def check_sessions_body(response: Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["errors"] is None
    SessionListResponse.model_validate(body)
    sessions: list[dict[str, Any]] = body["data"]["sessions"]
    for session in sessions:
        assert set(session) == {"id", "execute_count", "started_at", "last_execute_at", "expires_at"}
        for key in ("started_at", "last_execute_at", "expires_at"):
            assert isinstance(session[key], str), session
            assert RFC3339_UTC.match(session[key]), session
        assert session["execute_count"] >= 1
    return sessions


def check_error(response: Response, status: int, code: str, param: str | None = "<any>") -> dict[str, Any]:
    """The documented error envelope, with string fields only, and the retry header the SDKs obey."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-should-retry"] == ("true" if status == 429 else "false")
    body = response.json()
    assert set(body) == {"error", "data", "errors"}, body
    assert body["data"] is None
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    if param != "<any>":
        assert error["param"] == param, error
    assert isinstance(body["errors"], list), body
    assert body["errors"], body
    assert body["errors"][0]["code"] == code
    ErrorEnvelope.model_validate(body)
    envelope: dict[str, Any] = body
    return envelope


def canary(marker: Path) -> str:
    """Code with visible effects: creates ``marker`` on this host and bumps the session's counter."""
    return f"open({str(marker)!r}, 'w').close()\ncounter += 1\n"
