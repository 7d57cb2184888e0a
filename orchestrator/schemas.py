"""TCI wire models, mirroring the ``together`` SDK types field for field.

Requests accept what both SDK generations send. Responses are rendered by the ``render_*``
functions straight from domain objects (outputs can be megabytes; re-validating them through
pydantic on every reply would be wasted work); the models below document them in OpenAPI and
are what the tests validate replies against.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .models import ExecuteResult, SessionView


class FileInput(BaseModel):
    """A file written into the session's working directory before the code runs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field(min_length=1, max_length=1024)
    """Path relative to the working directory; subdirectories are created."""
    encoding: Literal["string", "base64"]
    """How ``content`` is encoded."""
    content: str
    """The file's content."""


class ExecuteRequest(BaseModel):
    """``POST /tci/execute`` body."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    code: str = Field(max_length=4 * 1024 * 1024)
    """The cell to run; IPython syntax (``!cmd``, ``%magic``) works."""
    language: Literal["python"] = "python"
    """Only ``python`` is supported."""
    session_id: str | None = Field(None, max_length=128)
    """Run in this session; omit it to start a new one."""
    files: list[FileInput] | None = Field(None, max_length=256)
    """Files to write before the code runs."""
    timeout: float | None = Field(None, gt=0)
    """Extension: this execute's time limit in seconds, capped by the server's maximum."""


class StreamOutput(BaseModel):
    """Text the code printed."""

    type: Literal["stdout", "stderr"]
    data: str


class ErrorOutput(BaseModel):
    """The code did not run successfully; ``data`` is the traceback or the reason."""

    type: Literal["error"]
    data: str


class DisplayOutput(BaseModel):
    """A rich result: a MIME bundle such as ``{"image/png": <base64>, "text/plain": ...}``."""

    type: Literal["display_data", "execute_result"]
    data: dict[str, Any]


Output = Annotated[StreamOutput | ErrorOutput | DisplayOutput, Field(discriminator="type")]


class ExecuteData(BaseModel):
    """A successful call: the code ran (its outputs may still hold an error)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    session_id: str
    status: Literal["success"] = "success"
    outputs: list[Output]
    errors: str | None = None
    """First line of the error when an ``error`` output is present (what 1.x clients check)."""
    outcome: str = "ok"
    """Extension: ok, error, timeout, interrupted, oom, kernel_died, not_run or sandbox_lost."""
    state_lost: bool = False
    """Extension: the kernel was restarted, so earlier variables are gone."""


class ExecuteResponse(BaseModel):
    """``POST /tci/execute`` reply."""

    data: ExecuteData
    errors: None = None


class SessionItem(BaseModel):
    """One live session."""

    id: str
    execute_count: int
    started_at: datetime
    last_execute_at: datetime
    expires_at: datetime


class SessionListData(BaseModel):
    sessions: list[SessionItem]


class SessionListResponse(BaseModel):
    """``GET /tci/sessions`` reply."""

    data: SessionListData
    errors: None = None


class FileEntry(BaseModel):
    """One entry of a session's working directory."""

    name: str
    path: str
    """Relative to the working directory; use it in the file routes."""
    type: Literal["file", "directory"]
    size: int
    """Bytes (0 for a directory)."""
    modified_at: datetime


class FileListData(BaseModel):
    path: str
    entries: list[FileEntry]
    truncated: bool = False
    """More entries exist than one listing returns."""


class FileListResponse(BaseModel):
    """``GET /tci/sessions/{id}/files`` reply."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "data": {
                        "path": "",
                        "entries": [
                            {
                                "name": "plots",
                                "path": "plots",
                                "type": "directory",
                                "size": 0,
                                "modified_at": "2026-11-30T04:00:00Z",
                            },
                            {
                                "name": "result.csv",
                                "path": "result.csv",
                                "type": "file",
                                "size": 5120,
                                "modified_at": "2026-11-30T04:01:12.5Z",
                            },
                        ],
                        "truncated": False,
                    },
                    "errors": None,
                }
            ]
        }
    )

    data: FileListData
    errors: None = None


class FileWrittenData(BaseModel):
    path: str
    size: int


class FileWrittenResponse(BaseModel):
    """``PUT /tci/sessions/{id}/files/{path}`` reply."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"data": {"path": "data/input.parquet", "size": 48213}, "errors": None}]}
    )

    data: FileWrittenData
    errors: None = None


class InterruptData(BaseModel):
    session_id: str
    interrupted: bool
    """Whether an execute was running and was sent the interrupt (False: the session was idle)."""


class InterruptResponse(BaseModel):
    """``POST /tci/sessions/{id}/interrupt`` reply."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"data": {"session_id": "ses_abc123def456ghi789jkl0", "interrupted": True}, "errors": None}]
        }
    )

    data: InterruptData
    errors: None = None


class ErrorBody(BaseModel):
    """The part both SDK generations read (1.x requires it to be an object of strings)."""

    message: str
    type: str
    param: str | None = None
    code: str


class ErrorEnvelope(BaseModel):
    """Every non-2xx body."""

    error: ErrorBody
    data: None = None
    errors: list[dict[str, str]]


def rfc3339(timestamp: float) -> str:
    """UTC timestamp with a ``Z`` suffix."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def render_execute(result: ExecuteResult) -> dict[str, Any]:
    """The success body for one execute."""
    has_error = any(output["type"] == "error" for output in result.outputs)
    return {
        "data": {
            "session_id": result.session_id,
            "status": "success",
            "outputs": result.outputs,
            "errors": (result.error_summary or "error") if has_error else None,
            "outcome": result.outcome,
            "state_lost": result.state_lost,
        },
        "errors": None,
    }


def render_sessions(views: list[SessionView]) -> dict[str, Any]:
    """The success body for the session list."""
    return {
        "data": {
            "sessions": [
                {
                    "id": view.session_id,
                    "execute_count": view.execute_count,
                    "started_at": rfc3339(view.started_at),
                    "last_execute_at": rfc3339(view.last_execute_at),
                    "expires_at": rfc3339(view.expires_at),
                }
                for view in views
            ]
        },
        "errors": None,
    }


def render_error(status: int, message: str, type_: str, code: str, param: str | None) -> dict[str, Any]:
    """The error envelope."""
    return {
        "error": {"message": message, "type": type_, "param": param, "code": code},
        "data": None,
        "errors": [{"code": code, "message": message}],
    }
