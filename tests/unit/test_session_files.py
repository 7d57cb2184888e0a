"""File requests cut off by the end of their session answer 404, not 502 (a fake manager and runner)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from orchestrator.errors import RunnerFailure, SessionNotFound
from orchestrator.sessions import SessionManager
from orchestrator.workspace import SessionFiles

pytestmark = pytest.mark.anyio


class _CutClient:
    async def request(self, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        raise RunnerFailure("stream ended")


class _Manager:
    """The session exists when a request starts and has been deleted when its stream breaks."""

    def __init__(self, deleted: bool) -> None:
        self.calls = 0
        self.deleted = deleted

    async def runner(self, tenant: str, session_id: str, *, reading: bool = False) -> Any:
        self.calls += 1
        if self.calls > 1 and self.deleted:
            raise SessionNotFound(f"Session {session_id} not found", param="session_id")
        return _CutClient()


@pytest.mark.parametrize("call", ["list", "read", "write", "delete"])
async def test_a_request_cut_by_a_delete_is_a_404(call: str) -> None:
    files = SessionFiles(cast(SessionManager, _Manager(deleted=True)), 1024)
    args: tuple[Any, ...] = ("t", "ses_x", "a.txt", b"x") if call == "write" else ("t", "ses_x", "a.txt")
    with pytest.raises(SessionNotFound):
        await getattr(files, call)(*args)
    # A session still there: the failure is the sandbox's, and said so.
    alive = SessionFiles(cast(SessionManager, _Manager(deleted=False)), 1024)
    with pytest.raises(RunnerFailure):
        await getattr(alive, call)(*args)
