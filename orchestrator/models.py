"""Domain types. They never carry wire concerns; ``schemas.py`` holds the TCI shapes."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Protocol

_ALPHABET = string.ascii_letters + string.digits
# 22 base62 characters carry 130 bits: ids cannot be guessed or enumerated.
_ID_LENGTH = 22


def new_session_id() -> str:
    """A fresh ``ses_`` id with at least 128 random bits."""
    return "ses_" + "".join(secrets.choice(_ALPHABET) for _ in range(_ID_LENGTH))


def looks_like_session_id(value: str) -> bool:
    """Cheap shape check before any lookup (ids never reach a log or the engine unchecked)."""
    body = value[4:]
    return value.startswith("ses_") and 8 <= len(body) <= 64 and all(c in _ALPHABET for c in body)


@dataclass(frozen=True)
class Claim:
    """Which session a sandbox serves. Recorded on the engine, so it survives a restart."""

    session_id: str
    tenant: str
    started_at: float
    expires_at: float
    listed: bool = True
    """False for a sandbox another surface holds by handle (a run lane): a restarted server removes it."""


@dataclass(frozen=True)
class SandboxInfo:
    """What the engine says about one sandbox (a snapshot, re-read on every ``Backend.list``)."""

    sandbox_id: str
    name: str
    running: bool
    created_at: float
    profile: str
    claim: Claim | None = None
    pristine: bool = True
    """False for an unclaimed sandbox a claim was interrupted on: it may hold a session's state, so it
    is never handed out as a warm one."""


@dataclass
class ExecuteResult:
    """One execute's outcome as the API returns it."""

    session_id: str
    outputs: list[dict[str, Any]]
    error_summary: str | None = None
    outcome: str = "ok"
    state_lost: bool = False
    dropped_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionView:
    """A live session as ``GET /tci/sessions`` lists it."""

    session_id: str
    execute_count: int
    started_at: float
    last_execute_at: float
    expires_at: float


class ExecuteWatcher(Protocol):
    """Told what a streaming execute does while it runs (``SessionManager.execute``)."""

    def started(self, session_id: str) -> None:
        """The runner accepted the request and is about to run the code: no refusal can follow."""

    def output(self, item: dict[str, Any]) -> None:
        """One validated output item, as produced; the final result stays authoritative."""
