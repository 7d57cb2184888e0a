"""A retry of an execute whose client gave up gets that attempt's result instead of a second run.

Both SDKs send ``POST /tci/execute`` again when they stop waiting for it, and code is not
idempotent. The 2.x SDK says how long it waits (``x-stainless-read-timeout``) and is answered
inside that; the 1.x SDK says nothing, so code that outlives a 1.x client's timeout is sent again
while it still runs, or just after it ended. An attempt whose client has disconnected is
*abandoned*; the next request on the same session with the same code, files and time limit is
taken for its retry:

- while the abandoned attempt runs, the retry waits for it and answers with its result;
- once it has ended (within ``REPLAY_SECONDS``, and only if no client received its result), the
  retry is answered with that result, once.

Any other execute on the session forgets it. A client that really meant to run the same code again
right after abandoning it gets the result of the run it abandoned: the state the session holds is
the one that result describes. Executes without a way to tell that their client left (run lanes,
streams) are never joined or replayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from .errors import OrchestratorError
from .models import ExecuteResult

Gone = Callable[[], Awaitable[bool]]

REPLAY_SECONDS: Final = 30.0
# An execute answered faster than any client timeout is taken as received, without asking.
_RECEIVED_UNDER: Final = 1.0


@dataclass(frozen=True)
class Request:
    """What makes two executes the same request."""

    code: str
    files: list[dict[str, str]] | None
    timeout: float


@dataclass
class _Attempt:
    request: Request
    result: asyncio.Future[ExecuteResult]
    callers: list[Gone] = field(default_factory=list)
    ended_at: float | None = None
    unreceived: bool = False
    handed_out: bool = False
    """A retry joined after the result was in: it has it, whatever the first caller did."""

    async def abandoned(self) -> bool:
        """Whether every client waiting for this attempt has gone."""
        for gone in self.callers:
            if not await gone():
                return False
        return True


class Attempts:
    """One session's latest execute, kept for a retry of it."""

    def __init__(self) -> None:
        self._last: _Attempt | None = None

    async def earlier(self, request: Request, gone: Gone | None) -> Awaitable[ExecuteResult] | None:
        """The earlier attempt's result to answer this retry with, or None: run it."""
        last = self._last
        if gone is None or last is None or last.request != request:
            return None
        if last.ended_at is None:
            if not last.callers or not await last.abandoned():
                return None  # its client still waits (or cannot tell): a second request, not a retry
            last.callers = [gone]  # every earlier one has just been seen gone
            last.handed_out = last.result.done()
            if last.ended_at is not None and self._last is last:
                self._last = None  # it ended while its callers were asked: handed out now, not again
            return asyncio.shield(last.result)
        if last.unreceived and time.monotonic() - last.ended_at <= REPLAY_SECONDS:
            self._last = None  # once
            return last.result
        return None

    def forget(self) -> None:
        """Something else happened on the session (an interrupt, a file request): no retry follows."""
        self._last = None

    async def run(self, request: Request, gone: Gone | None, work: Awaitable[ExecuteResult]) -> ExecuteResult:
        """Await ``work`` as this session's latest attempt."""
        attempt = _Attempt(request, asyncio.get_running_loop().create_future(), [gone] if gone else [])
        self._last = attempt
        began = time.monotonic()
        try:
            result = await work
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: a shutdown; a joined retry is not
                exc = OrchestratorError("the execute this request retries was stopped; it may have partly run")
            attempt.result.set_exception(exc)
            attempt.result.exception()  # retrieved here: there may be no one else to
            self._end(attempt)
            raise
        attempt.result.set_result(result)
        if attempt.callers and time.monotonic() - began >= _RECEIVED_UNDER:
            attempt.unreceived = await attempt.abandoned() and not attempt.handed_out
        self._end(attempt)
        return result

    def _end(self, attempt: _Attempt) -> None:
        attempt.ended_at = time.monotonic()
        attempt.callers = []  # each holds its whole HTTP request
        if self._last is not attempt:
            return
        if not attempt.unreceived:
            self._last = None  # its answer reached a client: nothing to replay, nothing to keep
            return
        # Kept for a retry a little longer, not until the session's next execute.
        asyncio.get_running_loop().call_later(REPLAY_SECONDS, self._drop, attempt)

    def _drop(self, attempt: _Attempt) -> None:
        if self._last is attempt:
            self._last = None
