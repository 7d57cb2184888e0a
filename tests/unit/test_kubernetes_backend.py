"""The Kubernetes backend's bookkeeping of attach websockets, with a stand-in socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.backends.kubernetes import KubernetesBackend
from orchestrator.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Socket:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> bool:
        await asyncio.sleep(0)  # a close frame goes out before the socket counts as closed
        self.closed = True
        return True


async def test_close_closes_the_socket_of_a_reader_cancelled_before_it_ran() -> None:
    backend = KubernetesBackend(Settings(backend="kubernetes"))
    socket = _Socket()

    async def reader() -> None:  # would close the socket itself, had it run
        await socket.close()

    pump = asyncio.create_task(reader())
    backend._track(pump, socket)  # type: ignore[arg-type]
    await backend.close()
    assert pump.cancelled()
    assert socket.closed, "the close scheduled for the reader's socket was cancelled too"


async def test_close_waits_for_closes_already_under_way() -> None:
    backend = KubernetesBackend(Settings(backend="kubernetes"))
    sockets = [_Socket() for _ in range(3)]
    pumps: list[asyncio.Task[Any]] = []
    for socket in sockets:
        pump = asyncio.create_task(asyncio.sleep(3600))
        backend._track(pump, socket)  # type: ignore[arg-type]
        pumps.append(pump)
    pumps[0].cancel()
    await asyncio.sleep(0)  # the first reader's close is scheduled before close() starts
    await backend.close()
    assert all(socket.closed for socket in sockets)
