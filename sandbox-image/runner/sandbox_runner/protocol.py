"""The runner's side of the runner protocol (see PROTOCOL.md next to this package).

Frames are a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Requests are
``{"id": str, "op": str, "args": {...}}``; replies are ``{"id": str, "ok": true, "result": {...}}``
or ``{"id": str, "ok": false, "error": {"code": str, "message": str, "param": str | null}}``.

The orchestrator keeps its own copy of these constants (``orchestrator/runner_client.py``);
``tests/contract`` drives this runner with that client so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from .framing import HEADER, STREAM_BIT, STREAM_IDS

PROTOCOL_VERSION: Final = 1
# Requests carry uploaded files, so they may be large; the orchestrator caps them well below this.
MAX_REQUEST_BYTES: Final = 96 * 1024 * 1024
# Written raw (outside any frame) before the reply to ``hello`` so that a client attaching to the
# middle of the byte stream can find a frame boundary again: it scans for this marker + its nonce.
SYNC_MARKER: Final = b"\x00TCI-SYNC:"

OPS: Final = frozenset(
    {
        "hello",
        "ready",
        "execute",
        "interrupt",
        "stats",
        "list_files",
        "read_file",
        "write_file",
        "delete_file",
        "run",
        "fetch",
    }
)
# Key of a progress frame: sent for an ``execute`` with ``stream: true`` before its reply, same id.
PROGRESS: Final = "progress"
_STREAM_NAMES: Final = {number: name for name, number in STREAM_IDS.items()}


class ProtocolError(Exception):
    """A frame that cannot be read: too large, truncated, or not a JSON object."""


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one message as a frame; lone surrogates become ``?`` so the bytes are valid UTF-8.

    The standard library's encoder, not a faster compiled one: a runner per session pays for every
    module it loads in memory (pydantic-core would add 8 MiB to each idle session).
    """
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", errors="replace")
    return HEADER.pack(len(body)) + body


async def read_interpreter_frame(reader: asyncio.StreamReader, max_bytes: int) -> dict[str, Any]:
    """One frame from the interpreter: a JSON object, or a stream frame as ``{"type": "stream", ...}``."""
    length = await _header(reader)
    if not length & STREAM_BIT:
        return _parse(await _body(reader, length, max_bytes))
    body = await _body(reader, length & ~STREAM_BIT, max_bytes)
    name = _STREAM_NAMES.get(body[0]) if body else None
    if name is None:
        raise ProtocolError("stream frame names no stream")
    return {"type": "stream", "name": name, "text": body[1:].decode("utf-8", errors="replace")}


async def _header(reader: asyncio.StreamReader) -> int:
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from exc
        raise ProtocolError("stream ended inside a frame header") from exc
    (length,) = HEADER.unpack(header)
    return int(length)


async def _body(reader: asyncio.StreamReader, length: int, max_bytes: int) -> bytes:
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte cap")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("stream ended inside a frame") from exc


def _parse(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def sync_line(nonce: str) -> bytes:
    """The raw marker written before the ``hello`` reply."""
    return SYNC_MARKER + nonce.encode("ascii", errors="replace") + b"\n"


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Read one frame; raise ``EOFError`` at a clean end of stream, ``ProtocolError`` otherwise."""
    return _parse(await _body(reader, await _header(reader), max_bytes))


def ok(request_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """A success reply."""
    return {"id": request_id, "ok": True, "result": result}


def progress(request_id: str, event: str, **fields: Any) -> dict[str, Any]:
    """A progress frame: ``started`` (the code is about to run) or ``output`` (one output item)."""
    return {"id": request_id, PROGRESS: event, **fields}


def fail(request_id: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """A refusal: the request was not carried out (for ``execute``: no code ran)."""
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message, "param": param}}
