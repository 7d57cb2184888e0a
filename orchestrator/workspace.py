"""A session's working directory: list, download, upload and delete, for the file routes and MCP.

Requests go to the session's runner beside any running execute, never queued behind it (the
runner serves them in a thread while the kernel runs): uploads are written aside and renamed into
place, so running code sees the old file or the new one, never half; a download of a file the
code is still writing gets whatever is on disk at that moment. The runner enforces the path
rules (``sandbox_runner/workspace.py``); replies are validated here, since they come from inside
the sandbox.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import mimetypes
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Final, Literal

import structlog
from pydantic import BaseModel, Field, ValidationError

from .errors import InvalidRequest, OrchestratorError, RunnerFailure
from .runner_client import RunnerClient, RunnerRefused
from .sessions import SessionManager

log = structlog.get_logger(__name__)

# Bytes per download request: large enough to be quick, small enough to keep frames modest.
CHUNK_BYTES: Final = 1024 * 1024
# A file request touches the disk only; it never waits for code.
_TIMEOUT: Final = 30.0


class Entry(BaseModel):
    """One directory entry, as the runner reports it."""

    name: str = Field(max_length=1024)
    path: str = Field(max_length=4096)
    type: Literal["file", "directory"]
    size: int = Field(ge=0)
    modified_at: float


class Listing(BaseModel):
    entries: list[Entry]
    truncated: bool = False


class _Chunk(BaseModel):
    content: str
    size: int = Field(ge=0)
    modified_at: float
    eof: bool


class _Written(BaseModel):
    path: str
    size: int = Field(ge=0)


def media_type(path: str) -> str:
    """The media type for a file's name, by its extension alone.

    ``mimetypes.guess_type`` reads a name that starts with ``data:`` as a data URL: a session could
    then choose the type (HTML for a download, an image for MCP), and put a line break in the header.
    """
    suffix = PurePosixPath(path).suffix
    return mimetypes.guess_type(f"file{suffix}")[0] or "application/octet-stream"


@dataclass
class Download:
    """An open download: its size is known and the first chunk read, so no error can follow the headers."""

    path: str
    size: int
    chunks: AsyncIterator[bytes]


async def _call(client: RunnerClient, op: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return await client.request(op, args, timeout=_TIMEOUT)
    except RunnerRefused as exc:
        raise exc.to_error() from exc


def _malformed(op: str, exc: Exception) -> RunnerFailure:
    return RunnerFailure(f"the sandbox sent a malformed {op} reply: {type(exc).__name__}")


class SessionFiles:
    """File access to the caller's sessions, through the one session layer (lookup, tenancy)."""

    def __init__(self, manager: SessionManager, max_download_bytes: int) -> None:
        self._manager = manager
        self._max_download = max_download_bytes

    @contextlib.asynccontextmanager
    async def _ended_is_not_found(self, tenant: str, session_id: str) -> AsyncIterator[None]:
        """A request cut off because the session was closed or expired meanwhile is a 404, not a 502."""
        try:
            yield
        except RunnerFailure:
            await self._manager.runner(tenant, session_id, reading=True)  # SessionNotFound once it has ended
            raise

    async def list(self, tenant: str, session_id: str, path: str) -> Listing:
        """Entries of one directory (``""`` is the working directory)."""
        client = await self._manager.runner(tenant, session_id, reading=True)
        async with self._ended_is_not_found(tenant, session_id):
            raw = await _call(client, "list_files", {"path": path})
        try:
            return Listing.model_validate(raw)
        except ValidationError as exc:
            raise _malformed("list_files", exc) from exc

    async def read(self, tenant: str, session_id: str, path: str, max_bytes: int | None = None) -> Download:
        """Open a download; refusals (missing, not a regular file, over the limit) raise here.

        ``max_bytes``: a limit lower than the download limit, for a caller that holds the whole file.
        """
        client = await self._manager.runner(tenant, session_id, reading=True)
        limit = self._max_download if max_bytes is None else min(max_bytes, self._max_download)
        async with self._ended_is_not_found(tenant, session_id):
            first, data = await self._chunk(client, path, 0, limit)

        async def chunks() -> AsyncIterator[bytes]:
            # Never more than the announced size: a file that grows meanwhile is cut there, one that
            # shrinks ends early (the client sees a short body, not a wrong one).
            yield data
            offset, eof = len(data), first.eof
            while not eof and offset < first.size:
                try:
                    chunk, more = await self._chunk(client, path, offset, self._max_download)
                except OrchestratorError as exc:
                    log.warning("download_cut", path=path, error=exc.message)
                    return
                part = more[: first.size - offset]
                if not part:
                    return
                offset, eof = offset + len(part), chunk.eof
                yield part

        return Download(path=path, size=first.size, chunks=chunks())

    async def _chunk(self, client: RunnerClient, path: str, offset: int, limit: int) -> tuple[_Chunk, bytes]:
        args = {"path": path, "offset": offset, "length": CHUNK_BYTES, "max_bytes": limit}
        raw = await _call(client, "read_file", args)
        try:
            chunk = _Chunk.model_validate(raw)
            data = base64.b64decode(chunk.content, validate=True)
        except (ValidationError, binascii.Error, ValueError) as exc:
            raise _malformed("read_file", exc) from exc
        return chunk, data

    async def read_all(self, tenant: str, session_id: str, path: str, max_bytes: int) -> bytes:
        """A whole file (MCP's ``read_file``), within ``max_bytes`` and the download limit."""
        download = await self.read(tenant, session_id, path, max_bytes)
        data = b"".join([part async for part in download.chunks])
        if len(data) != download.size:
            # A download can end short; a whole file handed back as such cannot.
            raise InvalidRequest(
                f"{path} changed while it was read ({download.size} bytes at first, {len(data)} read): read it again",
                param="path",
                code="file_changed",
            )
        return data

    async def write(self, tenant: str, session_id: str, path: str, content: bytes) -> tuple[str, int]:
        """Write one file (parents created, replaced atomically); the stored path and size."""
        client = await self._manager.runner(tenant, session_id)
        encoded = base64.b64encode(content).decode("ascii")
        async with self._ended_is_not_found(tenant, session_id):
            raw = await _call(client, "write_file", {"path": path, "content": encoded})
        try:
            written = _Written.model_validate(raw)
        except ValidationError as exc:
            raise _malformed("write_file", exc) from exc
        return written.path, written.size

    async def delete(self, tenant: str, session_id: str, path: str) -> None:
        """Remove one file or directory tree."""
        client = await self._manager.runner(tenant, session_id)
        async with self._ended_is_not_found(tenant, session_id):
            await _call(client, "delete_file", {"path": path})
