"""The interpreter's output: file descriptors 1 and 2 are pipes it reads itself, in a thread of its own.

What subprocesses, C code and ``os.write`` calls write goes into the pipes; what Python prints goes
through ``sys.stdout``/``sys.stderr`` (line-buffered), which send it themselves from the printing
thread: no thread hand-off on the common path. Text that starts to wait in an empty buffer first sends
what was written before it (the other stream's buffer, both pipes: ``before_hold``), so whatever the
pipes hold later came after it. Lines printed in a burst wait in the buffer; the output thread sends
them before what it then reads from the pipes, and a child process starts only once they are sent
(``before_child``, hooked by the shell). Before a display, an error or the end of a cell, the buffers
are sent and then both pipes drained under the channel's lock, so outputs keep the order the cell
produced them in. The stream caps are applied here, before anything is sent.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import select
import threading
import time
from typing import Any, Final

from .channel import InterpreterChannel
from .outputs import STREAMS, cut_utf8

# While a cell runs, the output thread wakes this often to send a partial line (``print(x, end="")``)
# that waits; between cells, this less often. Nothing wakes it just for text that waits: printing
# costs no thread hand-off. A partial line is so sent within 0.3 s (ipykernel: 0.2 s).
_FLUSH_INTERVAL: Final = 0.05
_IDLE_INTERVAL: Final = 0.25
# Python-level text is sent at a newline or once this many characters wait.
_BUFFER_CHARS: Final = 8192
# Lines printed faster than this after the last send wait for more (a print loop), at most
# _FLUSH_INTERVAL; an explicit flush() sends at once.
_COALESCE_SECONDS: Final = 0.001
_READ_BYTES: Final = 65536
# Reads of a pipe when it is drained; bounds the wait for a writer that never stops.
_DRAIN_READS: Final = 64


class OutputStream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr``: text buffered up to a newline, then sent (in a forked child: written
    to the file descriptor, for the parent to read)."""

    def __init__(self, fd: int, name: str, capture: Capture) -> None:
        super().__init__()
        self._fd = fd
        self._name = name
        self._capture = capture
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._size = 0
        self._sent_at = 0.0
        os.register_at_fork(after_in_child=self._forget)

    @property
    def name(self) -> str:
        return f"<{self._name}>"

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "replace"

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            if not self._parts and os.getpid() == self._capture.pid:
                self._capture.before_hold(self._name)
            self._parts.append(text)
            self._size += len(text)
            if self._size >= _BUFFER_CHARS or ("\n" in text and time.monotonic() - self._sent_at >= _COALESCE_SECONDS):
                self._write_out()
                return len(text)
        return len(text)

    def flush(self) -> None:
        """Send the buffer and what waits in the pipe: an explicit flush keeps the order of streams."""
        self.write_out()
        self._capture.forward(self._name)

    def write_out(self, *, wait: bool = True) -> None:
        """Send the buffered text; without ``wait``, not while a thread (this one, even) is writing to it."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._write_out()
        finally:
            self._lock.release()

    @property
    def pending(self) -> bool:
        """Whether text waits in the buffer."""
        return bool(self._parts)

    def take(self) -> str:
        """The buffered text, removed; empty when the buffer is busy (it is being written out)."""
        if not self._lock.acquire(blocking=False):
            return ""
        try:
            text = "".join(self._parts)
            self._parts.clear()
            self._size = 0
            return text
        finally:
            self._lock.release()

    def _write_out(self) -> None:
        if not self._parts:
            return
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        if os.getpid() == self._capture.pid:
            self._sent_at = time.monotonic()
            self._capture.send_text(self._name, text)
            return
        # A forked child: through the pipe, which its parent reads (blocking while the pipe is full).
        data = memoryview(text.encode("utf-8", errors="replace"))
        while data:
            data = data[os.write(self._fd, data) :]

    def _forget(self) -> None:
        # A forked child: another thread may have held the lock, and the parent prints its own buffer.
        self._lock = threading.Lock()
        self._parts = []
        self._size = 0


class Capture:
    """Reads fds 1 and 2 and sends what a running cell writes as ``stream`` frames, capped."""

    def __init__(self, channel: InterpreterChannel, max_stream_bytes: int) -> None:
        self._channel = channel
        self._cap = max_stream_bytes
        self._names: dict[int, str] = {}
        # Spare copies of the write ends (not inherited): user code that closes fd 1 or 2 gets them back
        # at the next cell.
        self._spares: dict[int, tuple[int, tuple[int, int]]] = {}
        for fd, name in zip((1, 2), STREAMS, strict=True):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)  # inheritable: subprocesses write into the same pipe
            status = os.fstat(write_end)
            self._spares[fd] = (write_end, (status.st_dev, status.st_ino))
            os.set_blocking(read_end, False)
            self._names[read_end] = name
        # Which pipes hold data, asked in one call before reading: most drains find both empty.
        self._readable = self._pipes_poll()
        self.streams = {name: OutputStream(fd, name, self) for fd, name in zip((1, 2), STREAMS, strict=True)}
        self._decoders = {name: utf8_decoder() for name in STREAMS}
        self._active = False
        # The process that reads the pipes; a forked child writes into them instead. Compared with getpid()
        # each time, not set by an at-fork hook: a child forked from C code runs no such hook.
        self.pid = os.getpid()
        self.used = dict.fromkeys(STREAMS, 0)
        self.dropped = dict.fromkeys(STREAMS, 0)
        threading.Thread(target=self._pump, name="tci-output", daemon=True).start()

    def send_text(self, name: str, text: str) -> None:
        """Send Python-level text of stream ``name`` (what its pipe holds came after it: ``before_hold``)."""
        with self._channel.lock:
            self._emit(name, text)

    def before_hold(self, name: str) -> None:
        """Text of stream ``name`` starts to wait in its empty buffer: what was written before it goes first."""
        with self._channel.lock:
            for other, stream in self.streams.items():
                if other != name:
                    self._emit(other, stream.take())
            self._drain()

    def begin(self) -> None:
        """A cell starts: what was written since the last one is discarded, the caps start again."""
        self._restore_descriptors()
        self.flush_streams()
        with self._channel.lock:
            self._drain()
            self._decoders = {name: utf8_decoder() for name in STREAMS}
            self.used = dict.fromkeys(STREAMS, 0)
            self.dropped = dict.fromkeys(STREAMS, 0)
            self._active = True

    def _restore_descriptors(self) -> None:
        for fd, (spare, identity) in self._spares.items():
            try:
                status = os.fstat(fd)
                same = (status.st_dev, status.st_ino) == identity
            except OSError:
                same = False
            if not same:
                os.dup2(spare, fd)

    def end(self) -> dict[str, int]:
        """The cell is over: send what it wrote; what it dropped, per stream."""
        self.flush_streams()
        with self._channel.lock:
            self._drain()
            for name, decoder in self._decoders.items():
                self._emit(name, decoder.decode(b"", final=True))
            self._active = False
        return {name: count for name, count in self.dropped.items() if count}

    def send(self, message: dict[str, Any]) -> None:
        """Send a display, result or error of the running cell after everything written before it."""
        self.flush_streams()
        with self._channel.lock:
            self._drain()
            if self._active:
                self._channel.send(message)

    def flush_streams(self) -> None:
        """Send the Python-level buffers (``sys.stdout`` may have been rebound: ours, not the current one)."""
        for stream in self.streams.values():
            stream.write_out()

    def before_child(self) -> None:
        """A child process is about to start: what was printed goes first, before it can write to the pipes.

        Without this, lines printed in a burst could still wait in a buffer when the child's output is read,
        and come after it. Called from fork hooks and ``Popen``, possibly inside a write of this same thread
        (a finaliser): a buffer being written to (by any thread) is left alone rather than waited for.
        """
        for stream in self.streams.values():
            # A forked child whose fd 1 or 2 is closed cannot write its buffer; its child still starts.
            with contextlib.suppress(OSError):
                stream.write_out(wait=False)

    def after_child(self) -> None:
        """A child process has exited: what it wrote to either pipe goes before what is printed next."""
        with self._channel.lock:
            self._drain()

    def forward(self, name: str) -> None:
        """Send what waits in the pipe of stream ``name`` now."""
        with self._channel.lock:
            self._drain(only=name)

    def _drain(self, only: str | None = None) -> None:
        """Send what waits in the pipes now (the caller holds the channel's lock)."""
        if os.getpid() != self.pid:
            return  # a forked child: the pipes are the parent's to read
        for fd, _ in self._readable.poll(0):
            if only is not None and self._names.get(fd) != only:
                continue
            for _ in range(_DRAIN_READS):
                if self._forward(fd) < _READ_BYTES:
                    break  # a short read emptied the pipe

    def _forward(self, fd: int) -> int:
        """Read once from ``fd`` and send it; the bytes read (0: none were there). Takes the channel's lock."""
        with self._channel.lock:
            try:
                data = os.read(fd, _READ_BYTES)
            except OSError:  # BlockingIOError: another reader took it
                return 0
            if data:
                name = self._names[fd]
                self._emit(name, self._decoders[name].decode(data))
            return len(data)

    def _emit(self, name: str, text: str) -> None:
        """Send ``text`` of stream ``name`` within the cap (the caller holds the channel's lock)."""
        if not text or not self._active:
            return
        data = text.encode("utf-8", errors="replace")
        if self.dropped[name]:
            self.dropped[name] += len(data)  # once something was dropped nothing more is kept: a prefix
            return
        room = self._cap - self.used[name]
        if len(data) > room:
            kept = cut_utf8(text, max(room, 0)).encode("utf-8", errors="replace")
            self.dropped[name] += len(data) - len(kept)
            data = kept
        self.used[name] += len(data)
        if data:
            self._channel.send_stream(name, data)

    def _pump(self) -> None:
        while True:
            try:
                self._pump_until_error()
            except Exception:  # noqa: BLE001, S112 - the cell must never block on a pipe nobody reads
                continue

    def _pump_until_error(self) -> None:
        # A poll object of its own: drains use theirs under the channel's lock, and poll objects refuse
        # concurrent use.
        poller = self._pipes_poll()
        while True:
            ready = poller.poll(1000 * (_FLUSH_INTERVAL if self._active else _IDLE_INTERVAL))
            if ready or (self._active and any(stream.pending for stream in self.streams.values())):
                self._send_waiting()

    def _pipes_poll(self) -> select.poll:
        poller = select.poll()
        for fd in self._names:
            poller.register(fd, select.POLLIN)
        return poller

    def _send_waiting(self) -> None:
        # Text waiting in a buffer was printed before what this thread has just seen in the pipes (it
        # wakes as soon as a pipe holds data), so it goes first: print('a'); print('b') and then a child's
        # output stay in that order. Taken without waiting for a stream that a thread is writing to now,
        # and sent straight from the buffer, never written to a pipe by this thread: it is the pipes' only
        # reader, and a full pipe would block it for good.
        with self._channel.lock:
            for name, stream in self.streams.items():
                self._emit(name, stream.take())
            self._drain()


def utf8_decoder() -> codecs.IncrementalDecoder:
    """Decodes output read in pieces: invalid UTF-8 becomes U+FFFD, a character split between reads is kept."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
