"""The runner protocol without the HTTP layer, through the orchestrator's own ``DockerBackend``.

``RunnerSandbox`` measures one ``execute`` of ``print(1)`` over the configured runner channel, to
set against the floor. ``kernel_starts`` measures how long a sandbox takes from ``docker start``
(and from ``docker create``) until the runner answers ``ready``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.backends.docker import DockerBackend
from orchestrator.models import SandboxInfo
from orchestrator.runner_client import RunnerClient

_READY_TIMEOUT = 60.0


async def _ready(client: RunnerClient) -> dict[str, object]:
    return await client.request("ready", {"timeout": _READY_TIMEOUT}, _READY_TIMEOUT + 5)


class RunnerSandbox:
    """One sandbox started the way a cold session starts, kept open for repeated executes."""

    def __init__(self, backend: DockerBackend) -> None:
        self._backend = backend
        self._sandbox: SandboxInfo | None = None
        self._client: RunnerClient | None = None
        self.inside_ms: list[float] = []
        """The runner's own ``duration_ms`` per execute (kernel execute → idle, inside the sandbox)."""

    async def start(self) -> None:
        self._sandbox = await self._backend.create(None)
        self._client = await self._backend.connect(self._sandbox, _READY_TIMEOUT)
        await _ready(self._client)

    async def round_trip(self, code: str = "print(1)") -> float:
        """Seconds for one ``execute`` request and its reply."""
        client = self._client
        assert client is not None, "start() first"
        began = time.perf_counter()
        result = await client.request("execute", {"code": code, "timeout": 30}, 60)
        elapsed = time.perf_counter() - began
        if code == "print(1)" and result.get("outputs") != [{"type": "stdout", "data": "1\n"}]:
            raise RuntimeError(f"runner returned {result.get('outputs')!r}")
        inside = result.get("duration_ms")
        if isinstance(inside, int | float):
            self.inside_ms.append(float(inside))
        return elapsed

    async def measure(self, count: int) -> list[float]:
        return [await self.round_trip() for _ in range(count)]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._sandbox is not None:
            await self._backend.destroy(self._sandbox.sandbox_id)
            self._sandbox = None


@dataclass
class KernelStarts:
    """Seconds per repetition: start→ready, create→ready, the runner's own kernel start, the start call."""

    start_to_ready: list[float] = field(default_factory=list)
    create_to_ready: list[float] = field(default_factory=list)
    kernel_startup: list[float] = field(default_factory=list)
    start_call: list[float] = field(default_factory=list)
    """How long the engine's ``start`` call itself took (part of ``start_to_ready``)."""


async def kernel_starts(backend: DockerBackend, count: int, progress: Callable[[str], None]) -> KernelStarts:
    """``count`` sandboxes, one after another: create, start, connect, ``hello``, ``ready``, remove.

    ``DockerBackend.create`` is ``create_stopped`` then ``start_sandbox``; they are called apart here
    to time ``docker start`` on its own.
    """
    result = KernelStarts()
    for index in range(count):
        created_at = time.perf_counter()
        sandbox = await backend.create_stopped(None)
        client: RunnerClient | None = None
        try:
            started_at = time.perf_counter()
            await backend.start_sandbox(sandbox.sandbox_id)
            start_returned = time.perf_counter()
            client = await backend.connect(sandbox, _READY_TIMEOUT)
            ready = await _ready(client)
            done = time.perf_counter()
        finally:
            if client is not None:
                await client.close()
            with contextlib.suppress(Exception):
                await backend.destroy(sandbox.sandbox_id)
        result.start_to_ready.append(done - started_at)
        result.create_to_ready.append(done - created_at)
        result.start_call.append(start_returned - started_at)
        startup = ready.get("kernel_startup_seconds")
        if isinstance(startup, int | float):
            result.kernel_startup.append(float(startup))
        progress(f"kernel start {index + 1}/{count}: start→ready {done - started_at:.3f} s")
    return result
