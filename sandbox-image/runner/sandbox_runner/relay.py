"""The package-index relay: pip's HTTP on the sandbox's loopback, carried to the index gate's socket.

The sandbox has no network interface but loopback, and pip speaks TCP, not Unix sockets. The
runner listens on ``127.0.0.1:<port>`` and copies every connection's bytes, both ways, to the
orchestrator's ``index.sock`` in the read-only channel directory. It adds nothing and checks
nothing: the gate on the other end decides what is allowed, so code that skips the relay and
dials the socket itself gets exactly the same answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still be answering
    except (ConnectionError, OSError):
        writer.close()


async def _relay(target: Path, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    reader, writer = client
    try:
        up_reader, up_writer = await asyncio.open_unix_connection(str(target))
    except OSError:
        writer.close()  # no gate (the orchestrator restarts): pip sees a refused request
        return
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


async def serve(port: int, target: Path) -> asyncio.Server:
    """Start relaying ``127.0.0.1:port`` to the Unix socket ``target``."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _relay(target, (reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", port)
    log.info("relaying 127.0.0.1:%d to %s", port, target)
    return server
