"""Latencies through the HTTP API, one request at a time over keep-alive connections.

The warm-execute figure is taken with the standard library's ``http.client``: ``httpx`` (the 2.x
SDK's transport) spends about three times its CPU per request in the benchmark's own process (0.9
against 0.3 ms measured side by side here), which the figure would otherwise count as the service's
latency. The same executes through ``httpx`` are reported beside it.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from .interrupt import checkpoint
from .server import Server, auth

_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def client_for(server: Server, key: str) -> httpx.Client:
    """A keep-alive client for ``server`` speaking as API key ``key``."""
    return httpx.Client(base_url=server.base_url, headers=auth(key), timeout=_TIMEOUT)


def execute(client: httpx.Client, code: str, session_id: str | None = None) -> dict[str, Any]:
    """POST /tci/execute; returns ``data`` (raises on anything but 200)."""
    body: dict[str, Any] = {"code": code, "language": "python"}
    if session_id is not None:
        body["session_id"] = session_id
    response = client.post("/tci/execute", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"execute answered {response.status_code}: {response.text[:500]}")
    data: dict[str, Any] = response.json()["data"]
    return data


def stdout_of(data: dict[str, Any]) -> str:
    """What an execute's ``data`` printed to stdout."""
    return "".join(o["data"] for o in data["outputs"] if o["type"] == "stdout")


def check_printed_one(data: dict[str, Any]) -> None:
    """Fail loudly if ``print(1)`` did not print ``1`` (a fast wrong answer is no result)."""
    stdout = stdout_of(data)
    if stdout != "1\n":
        raise RuntimeError(f"print(1) printed {stdout!r}: {data}")


def close_session(client: httpx.Client, session_id: str) -> None:
    response = client.delete(f"/tci/sessions/{session_id}")
    if response.status_code not in {204, 404}:
        raise RuntimeError(f"DELETE session answered {response.status_code}: {response.text[:300]}")


class LeanClient:
    """POSTs of JSON through one keep-alive ``http.client`` connection."""

    def __init__(self, server: Server, key: str) -> None:
        self._connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=_TIMEOUT.read)
        self._headers = {**auth(key), "Content-Type": "application/json"}

    def execute(self, body: bytes) -> dict[str, Any]:
        """POST /tci/execute with ``body``; returns ``data`` (raises on anything but 200)."""
        try:
            status, payload = self._post(body)
        except (http.client.RemoteDisconnected, ConnectionError):
            # The server closed the idle keep-alive connection (uvicorn: after 5 s); httpx reconnects too.
            self._connection.close()
            status, payload = self._post(body)
        if status != 200:
            raise RuntimeError(f"execute answered {status}: {payload[:500]!r}")
        data: dict[str, Any] = json.loads(payload)["data"]
        return data

    def _post(self, body: bytes) -> tuple[int, bytes]:
        self._connection.request("POST", "/tci/execute", body=body, headers=self._headers)
        response = self._connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self._connection.close()


class WarmSession:
    """One session kept open for repeated warm executes, through either client."""

    def __init__(self, server: Server, key: str) -> None:
        self._client = client_for(server, key)
        self._lean = LeanClient(server, key)
        data = execute(self._client, "print(1)")
        check_printed_one(data)
        self.session_id: str = data["session_id"]
        self._body = json.dumps({"code": "print(1)", "language": "python", "session_id": self.session_id}).encode()

    def round_trip(self, *, via_httpx: bool = False) -> float:
        began = time.perf_counter()
        data = execute(self._client, "print(1)", self.session_id) if via_httpx else self._lean.execute(self._body)
        elapsed = time.perf_counter() - began
        check_printed_one(data)
        return elapsed

    def measure(self, count: int, *, via_httpx: bool = False) -> list[float]:
        return [self.round_trip(via_httpx=via_httpx) for _ in range(count)]

    def close(self) -> None:
        try:
            close_session(self._client, self.session_id)
        finally:
            self._client.close()
            self._lean.close()


def new_session_latencies(
    server: Server, key: str, count: int, *, wait_for_pool: bool, progress: Callable[[str], None]
) -> list[float]:
    """Seconds from POST (no session id, ``print(1)``) to its result, ``count`` times.

    Each new session is deleted again outside the timed part. With ``wait_for_pool`` every
    repetition starts on a full pool, so each one measures a pool hit (the caller checks the
    hit counter to prove it).
    """
    samples: list[float] = []
    with client_for(server, key) as client:
        for index in range(count):
            checkpoint()
            refill = server.wait_pool_full() if wait_for_pool else 0.0
            began = time.perf_counter()
            data = execute(client, "print(1)")
            elapsed = time.perf_counter() - began
            check_printed_one(data)
            samples.append(elapsed)
            close_session(client, data["session_id"])
            note = f" (pool refilled in {refill:.2f} s)" if wait_for_pool else ""
            progress(f"{server.name}: new session {index + 1}/{count}: {elapsed * 1000:.0f} ms{note}")
    return samples
