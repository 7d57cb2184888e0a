"""Interrupting a session's running execute (the interrupt route, and a streaming client that leaves)."""

from __future__ import annotations

from .runner_client import RunnerRefused
from .sessions import SessionManager


async def interrupt(manager: SessionManager, tenant: str, session_id: str) -> bool:
    """SIGINT the code the session is running; whether any was running (the runner knows best).

    The interrupted execute answers ``outcome: "interrupted"``; executes queued behind it run as usual.

    Raises:
        SessionNotFound: unknown, expired or another tenant's session.
    """
    client = await manager.runner(tenant, session_id)
    try:
        result = await client.request("interrupt", {}, timeout=10)
    except RunnerRefused as exc:
        raise exc.to_error() from exc
    return result.get("interrupted") is True
