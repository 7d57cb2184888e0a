"""Runner channels over Unix sockets: the host listens, the runner inside the sandbox dials out.

Each sandbox gets a directory of its own on the host, ``<socket_dir>/<instance digest>/<key>/``,
holding one listening socket, ``runner.sock`` (and, with package installs on, the index gate's
``index.sock``: see ``index_gate.py``). The directory is bind-mounted **read-only** into
that sandbox (and no other), so code inside can connect but can neither replace the socket nor
add entries; which sandbox a connection comes from is known by the socket it arrived on, so no
shared secret is needed. Unlike the engine's attach stream, bytes go straight from one process to
the other, without dockerd and the container shim in between.

Any process in the sandbox can connect, not only the runner. Each listener therefore holds at
most one connection waiting to be taken (a newer one replaces it); whatever connects is treated as
untrusted by ``RunnerClient`` like everything else from a sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..errors import RunnerFailure
from ..index_gate import IndexGate
from ..runner_client import close_stream

SOCKET_NAME: Final = "runner.sock"
# The kernel's limit on a Unix socket path (sun_path), including the terminating NUL.
MAX_SOCKET_PATH: Final = 107
# Loop turns from an accept to its connection's callback (and from a close to the socket's release).
_SETTLE_TURNS: Final = 3

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class _Listener:
    server: asyncio.Server | None = None
    waiting: Connection | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False

    def offer(self, connection: Connection) -> None:
        if self.stopped:
            # Accepted by the loop just before the server closed: nobody will ever take it.
            connection[1].close()
            return
        if self.waiting is not None:
            self.waiting[1].close()
        self.waiting = connection
        self.arrived.set()

    def take(self) -> Connection | None:
        connection, self.waiting = self.waiting, None
        self.arrived.clear()
        return connection


def instance_dir(root: Path, instance: str) -> Path:
    """This instance's directory under ``root`` (a digest keeps socket paths short)."""
    return root / hashlib.sha256(instance.encode()).hexdigest()[:8]


class SocketChannels:
    """One listening socket per sandbox, keyed by a random token recorded on the sandbox."""

    def __init__(self, root: Path, instance: str, *, max_frame_bytes: int, gate: IndexGate | None = None) -> None:
        self._dir = instance_dir(root, instance)
        self._limit = max_frame_bytes + 1024
        self._listeners: dict[str, _Listener] = {}
        self._gate = gate

    def check(self) -> None:
        """Fail early on a socket directory that cannot work (too long a path, not creatable).

        Raises:
            RunnerFailure: with what to change.
        """
        longest = self.host_dir("0" * 16) / SOCKET_NAME
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise RunnerFailure(f"socket paths such as {longest} exceed {MAX_SOCKET_PATH} bytes; shorten socket_dir")
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunnerFailure(f"cannot create the socket directory {self._dir}: {exc}") from exc

    def host_dir(self, key: str) -> Path:
        """The directory to bind-mount (read-only) into the sandbox with this key."""
        return self._dir / key

    async def open(self, key: str) -> Path:
        """Listen for the sandbox ``key`` (again, after a restart); returns its directory."""
        if key in self._listeners:
            return self.host_dir(key)
        directory = self.host_dir(key)
        path = directory / SOCKET_NAME
        if len(str(path)) > MAX_SOCKET_PATH:
            raise RunnerFailure(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; shorten socket_dir")
        directory.mkdir(parents=True, exist_ok=True)
        # The sandbox's user must reach the socket through the mount; nothing in it is secret.
        directory.chmod(0o755)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an earlier orchestrator process: its listener is gone

        listener = _Listener()

        # A plain callback, not a coroutine: it runs as the connection is made, where a task could still
        # be waiting to start when the loop stops, and the connection would then never be closed.
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            listener.offer((reader, writer))

        listener.server = await asyncio.start_unix_server(on_connect, path=str(path), limit=self._limit)
        path.chmod(0o666)
        if self._gate is not None:
            await self._gate.open_sandbox(key, directory)
        self._listeners[key] = listener
        return directory

    async def accept(self, key: str, timeout: float) -> Connection:
        """The next connection from the sandbox ``key`` (one that arrived already counts).

        Raises:
            RunnerFailure: nothing connected within ``timeout``.
        """
        await self.open(key)
        listener = self._listeners[key]
        try:
            async with asyncio.timeout(timeout):
                while (connection := listener.take()) is None:
                    await listener.arrived.wait()
        except TimeoutError as exc:
            raise RunnerFailure(f"sandbox channel {key}: the runner did not connect within {timeout:g} s") from exc
        return connection

    async def close(self, key: str) -> None:
        """Stop listening for ``key`` and remove its directory (idempotent)."""
        listener = self._listeners.pop(key, None)
        if listener is not None:
            await self._stop(listener)
        if self._gate is not None:
            await self._gate.close_sandbox(key)
        shutil.rmtree(self.host_dir(key), ignore_errors=True)
        with contextlib.suppress(OSError):
            self._dir.rmdir()  # only once it is empty: the instance's last sandbox is gone

    async def close_all(self) -> None:
        """Stop every listener; directories stay so that runners find them after a restart."""
        listeners, self._listeners = dict(self._listeners), {}
        for key, listener in listeners.items():
            await self._stop(listener)
            if self._gate is not None:
                await self._gate.close_sandbox(key)

    @staticmethod
    async def _stop(listener: _Listener) -> None:
        # Not wait_closed(): from Python 3.12 it also waits for the connection a client still holds.
        listener.stopped = True
        if listener.server is not None:
            # Accepting stops first and the server closes only once the connections the loop accepted just
            # before are offered (and closed) on its next turns: on asyncio's own loop a connection accepted
            # before close() whose transport is made after it fails an assertion in Server._attach, and its
            # socket is left to the garbage collector. (uvloop's server has no such reader to remove.)
            loop = asyncio.get_running_loop()
            for sock in listener.server.sockets:
                loop.remove_reader(sock.fileno())
            for _ in range(_SETTLE_TURNS):
                await asyncio.sleep(0)
            listener.server.close()
            # Let the closes finish while the loop still runs (it may stop right after a shutdown).
            for _ in range(_SETTLE_TURNS):
                await asyncio.sleep(0)
        waiting = listener.take()
        if waiting is not None:
            await close_stream(waiting[1])

    def sweep(self, keep: set[str], grace: float) -> list[str]:
        """Remove directories of sandboxes that no longer exist; returns the keys removed."""
        if not self._dir.is_dir():
            return []
        removed = []
        cutoff = time.time() - grace
        for entry in self._dir.iterdir():
            if entry.name in keep or entry.name in self._listeners:
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.lstat().st_mtime > cutoff:
                    continue  # its sandbox may still be being created
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        return removed
