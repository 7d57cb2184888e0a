"""Concurrent load through the HTTP API: many sessions, a burst (``httpx``), throughput (``aiohttp``)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from .server import Server, auth

_TIMEOUT = httpx.Timeout(300.0, connect=30.0)
# Alternated by every throughput worker: an assignment and a print, the smallest useful snippets.
SNIPPETS = ("x = 1", "print(1)")


@dataclass(frozen=True)
class LiveSession:
    key: str
    session_id: str


def async_client(server: Server, connections: int) -> httpx.AsyncClient:
    """One pooled client for many concurrent requests; the API key goes on each request."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=server.base_url, timeout=_TIMEOUT, limits=limits)


def _execute_body(code: str, session_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "language": "python"}
    if session_id is not None:
        body["session_id"] = session_id
    return body


async def _post(client: httpx.AsyncClient, key: str, code: str, session_id: str | None = None) -> httpx.Response:
    return await client.post("/tci/execute", json=_execute_body(code, session_id), headers=auth(key))


async def create_sessions(
    server: Server, keys: Sequence[str], count: int, *, parallel: int, progress: Callable[[str], None]
) -> list[LiveSession]:
    """``count`` new sessions (``print(1)`` each), spread round-robin over ``keys``.

    At most ``parallel`` requests are in flight; the server queues creates beyond its own limit.
    """
    gate = asyncio.Semaphore(parallel)
    made: list[LiveSession] = []

    async def one(index: int, client: httpx.AsyncClient) -> None:
        key = keys[index % len(keys)]
        async with gate:
            response = await _post(client, key, "print(1)")
        if response.status_code != 200:
            raise RuntimeError(f"session create answered {response.status_code}: {response.text[:300]}")
        made.append(LiveSession(key, response.json()["data"]["session_id"]))
        if len(made) % 10 == 0 or len(made) == count:
            progress(f"{server.name}: {len(made)}/{count} sessions created")

    async with async_client(server, parallel) as client:
        await asyncio.gather(*(one(index, client) for index in range(count)))
    return made


async def close_sessions(server: Server, sessions: Sequence[LiveSession], *, parallel: int = 8) -> Counter[int]:
    """DELETE every session; returns the status codes seen."""
    gate = asyncio.Semaphore(parallel)
    statuses: Counter[int] = Counter()

    async def one(session: LiveSession, client: httpx.AsyncClient) -> None:
        async with gate:
            response = await client.delete(f"/tci/sessions/{session.session_id}", headers=auth(session.key))
        statuses[response.status_code] += 1

    async with async_client(server, parallel) as client:
        await asyncio.gather(*(one(session, client) for session in sessions))
    return statuses


@dataclass
class Throughput:
    sessions: int
    seconds: float
    completed: int = 0
    completed_all: int = 0
    """Including the executes that were in flight at the deadline (for per-execute CPU cost)."""
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


async def throughput(server: Server, sessions: Sequence[LiveSession], seconds: float) -> Throughput:
    """Executes per second with one sequential worker per session, for a fixed ``seconds``.

    Only executes that finish inside the window count; the ones still in flight at its end
    are awaited (so the next level starts on idle sessions) but not counted. The driver shares the
    two cores with what it measures, so it is aiohttp's client: at 16 sessions httpx's took 2.8 ms
    of CPU per request, more than the service's own 2.4 ms (the raw kernels' jupyter_client: 1.5).
    """
    result = Throughput(sessions=len(sessions), seconds=seconds)
    connector = aiohttp.TCPConnector(limit=len(sessions))
    timeout = aiohttp.ClientTimeout(total=_TIMEOUT.read, connect=_TIMEOUT.connect)
    async with aiohttp.ClientSession(server.base_url, connector=connector, timeout=timeout) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def post(session: LiveSession, code: str) -> int:
            body = _execute_body(code, session.session_id)
            async with client.post("/tci/execute", json=body, headers=auth(session.key)) as response:
                await response.read()
                return response.status

        async def worker(session: LiveSession, offset: int) -> None:
            turn = offset
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    status = await post(session, SNIPPETS[turn % 2])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.errors[type(exc).__name__] += 1
                    continue
                finished = time.perf_counter()
                turn += 1
                if status != 200:
                    result.errors[str(status)] += 1
                    continue
                result.completed_all += 1
                if finished <= deadline:
                    result.completed += 1
                    result.latencies.append(finished - began)

        await asyncio.gather(*(worker(session, index) for index, session in enumerate(sessions)))
    return result


@dataclass
class Burst:
    requests: int
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_ok: list[float] = field(default_factory=list)
    latencies_all: list[float] = field(default_factory=list)
    transport_errors: Counter[str] = field(default_factory=Counter)
    sessions: list[LiveSession] = field(default_factory=list)
    retry_after_missing: int = 0
    """429 answers without a ``Retry-After`` header (the SDKs need it to back off)."""


async def burst(server: Server, keys: Sequence[str], count: int) -> Burst:
    """``count`` new-session requests released at the same instant, round-robin over ``keys``."""
    result = Burst(requests=count)

    async def one(index: int, client: httpx.AsyncClient) -> None:
        key = keys[index % len(keys)]
        began = time.perf_counter()
        try:
            response = await _post(client, key, "print(1)")
        except httpx.HTTPError as exc:
            result.transport_errors[type(exc).__name__] += 1
            return
        elapsed = time.perf_counter() - began
        result.statuses[response.status_code] += 1
        result.latencies_all.append(elapsed)
        if response.status_code == 429 and "retry-after" not in response.headers:
            result.retry_after_missing += 1
        if response.status_code == 200:
            result.latencies_ok.append(elapsed)
            result.sessions.append(LiveSession(key, response.json()["data"]["session_id"]))

    async with async_client(server, count) as client:
        # gather starts every request in the same loop iteration: they hit the server together.
        await asyncio.gather(*(one(index, client) for index in range(count)))
    return result
