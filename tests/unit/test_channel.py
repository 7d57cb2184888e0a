"""Per-sandbox runner sockets: one listener per key, one waiting connection, directories cleaned up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.backends.channel import SOCKET_NAME, SocketChannels, instance_dir
from orchestrator.errors import RunnerFailure

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def root() -> Iterator[Path]:
    # Unix socket paths are short, and pytest's tmp_path can be long.
    short = Path(tempfile.mkdtemp(prefix="tci-t-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


async def dial(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(str(path))


async def test_listener_is_reachable_by_the_sandbox_user_and_hands_over_a_connection(root: Path) -> None:
    channels = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    directory = await channels.open("k1")
    socket_path = directory / SOCKET_NAME
    assert directory == instance_dir(root, "inst") / "k1"
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o666
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755

    _, client_writer = await dial(socket_path)
    reader, writer = await channels.accept("k1", timeout=5)
    client_writer.write(b"ping")
    await client_writer.drain()
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    client_writer.close()
    await channels.close_all()


async def test_a_newer_connection_replaces_the_waiting_one(root: Path) -> None:
    channels = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    path = await channels.open("k") / SOCKET_NAME
    first_reader, first_writer = await dial(path)
    _, second_writer = await dial(path)
    second_writer.write(b"2")
    await second_writer.drain()
    # The listener closes the first connection once the second one replaces it.
    assert await asyncio.wait_for(first_reader.read(), 5) == b""
    reader, writer = await channels.accept("k", timeout=5)
    assert await reader.readexactly(1) == b"2"
    for each in (first_writer, second_writer, writer):
        each.close()
    await channels.close_all()


async def test_accept_times_out_when_nothing_connects(root: Path) -> None:
    channels = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    with pytest.raises(RunnerFailure, match=r"did not connect within 0\.05 s"):
        await channels.accept("k", timeout=0.05)
    await channels.close_all()


async def test_reopening_after_a_restart_replaces_the_stale_socket(root: Path) -> None:
    first = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    path = await first.open("k") / SOCKET_NAME
    await first.close_all()
    assert path.exists(), "directories outlive the process so runners find them again"
    second = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    await second.open("k")
    _, client_writer = await dial(path)
    _, writer = await second.accept("k", timeout=5)
    client_writer.close()
    writer.close()
    await second.close_all()


async def test_close_removes_the_directory_and_sweep_removes_only_old_unknown_ones(root: Path) -> None:
    channels = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    await channels.open("live")
    await channels.open("gone")
    await channels.close("gone")
    assert not (instance_dir(root, "inst") / "gone").exists()
    await channels.close("gone")  # idempotent

    base = instance_dir(root, "inst")
    for name in ("old-stray", "young-stray", "kept"):
        (base / name).mkdir()
    old = time.time() - 3600
    os.utime(base / "old-stray", (old, old))
    os.utime(base / "kept", (old, old))
    assert channels.sweep(keep={"kept"}, grace=60) == ["old-stray"]
    assert sorted(p.name for p in base.iterdir()) == ["kept", "live", "young-stray"]
    other = instance_dir(root, "other-instance")
    other.mkdir()
    channels.sweep(keep=set(), grace=0)
    assert other.exists(), "another instance's directories are never touched"
    await channels.close_all()


async def test_an_overlong_socket_path_is_refused(tmp_path: Path) -> None:
    channels = SocketChannels(tmp_path / ("x" * 120), "inst", max_frame_bytes=1 << 20)
    with pytest.raises(RunnerFailure, match="exceed 107 bytes; shorten socket_dir"):
        channels.check()  # at start-up, before any session
    with pytest.raises(RunnerFailure, match="longer than 107 bytes"):
        await channels.open("k")


def test_check_creates_the_instance_directory(root: Path) -> None:
    SocketChannels(root / "nested", "inst", max_frame_bytes=1 << 20).check()
    assert instance_dir(root / "nested", "inst").is_dir()


@pytest.mark.parametrize("turns", range(6))
async def test_connections_accepted_as_the_listener_stops_are_closed(root: Path, turns: int) -> None:
    # On asyncio's own loop, a connection accepted just before the server closed used to fail its
    # transport's creation and keep its socket open (until the garbage collector warned about it).
    channels = SocketChannels(root, "inst", max_frame_bytes=1 << 20)
    path = await channels.open("k") / SOCKET_NAME
    clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
    try:
        for client in clients:
            client.connect(str(path))
        for _ in range(turns):
            await asyncio.sleep(0)  # the loop gets to accept them at a different point each time
        await channels.close_all()
        for client in clients:
            client.settimeout(5)
            # Never accepted: the listening socket's close refused it (a reset).
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""  # our end is closed
    finally:
        for client in clients:
            client.close()
