"""The interpreter's end of its socket to the runner: the runner protocol's framing, blocking, two threads.

Frames are those of the runner protocol (``framing.HEADER`` + UTF-8 JSON). Two threads send (the
cell's and the output thread), so every frame is written whole under ``lock``, which callers also
hold to keep several frames in order. A forked child forgets the socket: it must never write into
its parent's stream (its output reaches the parent through the inherited pipes instead).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
from typing import Any

from .framing import HEADER, stream_frame


class InterpreterChannel:
    """Frames over one connected socket; ``send`` from any thread, ``receive`` from the main thread."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        sock.set_inheritable(False)
        self._sock: socket.socket | None = sock
        self._reader = sock.makefile("rb")
        self.max_frame_bytes = max_frame_bytes
        self.lock = threading.RLock()
        os.register_at_fork(after_in_child=self._forget)

    def send(self, message: dict[str, Any]) -> None:
        """Write one frame; a display too large for the runner's cap is replaced by a note of its size."""
        body = encode(message)
        if len(body) > self.max_frame_bytes:
            body = encode(oversized(message, len(body), self.max_frame_bytes))
        self._write(HEADER.pack(len(body)) + body)

    def _write(self, frame: bytes) -> None:
        with self.lock:
            if self._sock is None:
                return
            # An interrupt landing mid-frame would leave half a frame on the stream (the runner would then
            # have to restart the interpreter): SIGINT waits until the frame is out.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                self._sock.sendall(frame)
            except OSError:
                self._sock = None  # the runner has gone: receive() ends the interpreter
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def send_stream(self, name: str, data: bytes) -> None:
        """Write one stream frame: ``data`` is UTF-8 text of the stream ``name``."""
        self._write(stream_frame(name, data))

    def receive(self) -> dict[str, Any] | None:
        """The next request, or None once the runner has gone (or sent something unreadable)."""
        header = self._reader.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        (length,) = HEADER.unpack(header)
        body = self._reader.read(length)
        if len(body) < length:
            return None
        try:
            message = json.loads(body.decode("utf-8", errors="replace"))
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def _forget(self) -> None:
        self._sock = None
        self.lock = threading.RLock()


def encode(message: dict[str, Any]) -> bytes:
    """JSON bytes of ``message``; what JSON cannot hold is converted as Jupyter's ``json_clean`` would."""
    try:
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"), default=_jsonable)
    except (TypeError, ValueError):
        text = json.dumps(_clean(message), ensure_ascii=False, separators=(",", ":"), default=_jsonable)
    # Lone surrogates (from user strings) become "?": the frame is always valid UTF-8.
    return text.encode("utf-8", errors="replace")


def oversized(message: dict[str, Any], size: int, cap: int) -> dict[str, Any]:
    """What is sent instead of a frame over ``cap``: displays are dropped whole, errors cut."""
    if message.get("type") == "error":
        text = "\n".join(str(line) for line in message.get("traceback") or [])
        keep = cap // 2
        return {
            "type": "error",
            "ename": str(message.get("ename", "Error"))[:1000],
            "evalue": str(message.get("evalue", ""))[:1000],
            "traceback": [text[:keep] + f"\n[error truncated: {size - keep} bytes dropped]"],
        }
    return {"type": "display_dropped", "bytes": size}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset):
        return list(value)
    return repr(value)


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value
