"""The interpreter's output: file descriptors 1 and 2 are pipes it reads itself, in a thread of its own.

What subprocesses, C code and ``os.write`` calls write goes into the pipes; what Python prints goes
through ``sys.stdout``/``sys.stderr`` (line-buffered), which send it themselves from the printing
thread: no thread hand-off on the common path.

Order rests on one rule: text waiting in a stream's buffer is older than what the pipes hold. A
write keeps it true by looking at the pipes first (at most every ``_CHECK_SECONDS``): what they
hold then came after the buffered text and before the new text, so both go out before the new text
is buffered. Every send (a line, a flush, the output thread, a display, the end of a cell) is then
buffered text first, pipes second, under the channel's lock. The stream caps are applied here,
before anything is sent.
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
# A write looks at the pipes unless the last write of its stream did within this: the look is a system
# call, and a print loop would otherwise pay it twice a line. Only what a cell writes to a descriptor
# and then prints within this window can come after that print.
_CHECK_SECONDS: Final = 0.00005
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
        self._checked_at = 0.0
        # A poll object of this stream's own, guarded by its lock: poll objects refuse concurrent use.
        self._pipes = capture.pipe_poller()
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
            now = time.monotonic()
            if now - self._checked_at >= _CHECK_SECONDS:
                self._checked_at = now
                # (A forked child leaves the pipes to its parent.)
                if self._pipes.poll(0) and os.getpid() == self._capture.pid:
                    self._capture.send_buffered(self)
            self._parts.append(text)
            self._size += len(text)
            if self._size >= _BUFFER_CHARS or ("\n" in text and now - self._sent_at >= _COALESCE_SECONDS):
                self._write_out(now)
        return len(text)

    def flush(self) -> None:
        """Send the buffer and what waits in the pipes: an explicit flush keeps the order of streams."""
        with self._lock:
            self._write_out(time.monotonic())

    def _write_out(self, now: float) -> None:
        if os.getpid() == self._capture.pid:
            self._sent_at = now
            self._capture.send_buffered(self)
            return
        # A forked child: through the pipe, which its parent reads (blocking while the pipe is full).
        data = memoryview(self.take_held().encode("utf-8", errors="replace"))
        while data:
            data = data[os.write(self._fd, data) :]

    @property
    def lock(self) -> threading.Lock:
        """Held while text is added to the buffer or taken from it."""
        return self._lock

    @property
    def pending(self) -> bool:
        """Whether text waits in the buffer."""
        return bool(self._parts)

    def take(self) -> str:
        """The buffered text, removed; empty when another thread holds the buffer (it is writing to it)."""
        if not self._lock.acquire(blocking=False):
            return ""
        try:
            return self.take_held()
        finally:
            self._lock.release()

    def take_held(self) -> str:
        """``take`` for a caller that holds the buffer's lock."""
        text = "".join(self._parts)
        self._parts.clear()
        self._size = 0
        return text

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
        # Which pipes hold data, asked in one call before reading: most drains find both empty.
        self._readable = select.poll()
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
            self._readable.register(read_end, select.POLLIN)
        self.streams = {name: OutputStream(fd, name, self) for fd, name in zip((1, 2), STREAMS, strict=True)}
        self._decoders = {name: _decoder() for name in STREAMS}
        self._active = False
        # The process that reads the pipes; a forked child writes into them instead. Compared with getpid()
        # each time, not set by an at-fork hook: a child forked from C code runs no such hook.
        self.pid = os.getpid()
        self.used = dict.fromkeys(STREAMS, 0)
        self.dropped = dict.fromkeys(STREAMS, 0)
        threading.Thread(target=self._pump, name="tci-output", daemon=True).start()

    def pipe_poller(self) -> select.poll:
        """A new poll object on the pipes' read ends."""
        poller = select.poll()
        for fd in self._names:
            poller.register(fd, select.POLLIN)
        return poller

    def send_buffered(self, holder: OutputStream) -> None:
        """Send every stream's buffered text, then what waits in the pipes; the caller holds ``holder``'s lock.

        Another stream's text is taken only if nobody holds it: a thread writing to it now is not
        ordered with this one anyway.
        """
        with self._channel.lock:
            for name, stream in self.streams.items():
                self._emit(name, stream.take_held() if stream is holder else stream.take())
            self._drain()

    def flush_streams(self) -> None:
        """Send every stream's buffered text, then what waits in the pipes (from any thread holding no stream)."""
        # Every stream is held first, in the order writers take them (stream, then channel): a writer must
        # not be between its look at the pipes and its text while this thread reads the pipes.
        with contextlib.ExitStack() as held:
            for stream in self.streams.values():
                held.enter_context(stream.lock)
            with self._channel.lock:
                for name, stream in self.streams.items():
                    self._emit(name, stream.take_held())
                self._drain()

    def begin(self) -> None:
        """A cell starts: what was written since the last one is discarded, the caps start again."""
        self._restore_descriptors()
        self.flush_streams()
        with self._channel.lock:
            self._decoders = {name: _decoder() for name in STREAMS}
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
            for name, decoder in self._decoders.items():
                self._emit(name, decoder.decode(b"", final=True))
            self._active = False
        return {name: count for name, count in self.dropped.items() if count}

    def send(self, message: dict[str, Any]) -> None:
        """Send a display, result or error of the running cell after everything written before it."""
        self.flush_streams()
        with self._channel.lock:
            if self._active:
                self._channel.send(message)

    def _drain(self) -> None:
        """Send what waits in the pipes now (the caller holds the channel's lock)."""
        if os.getpid() != self.pid:
            return  # a forked child: the pipes are the parent's to read
        for fd, _ in self._readable.poll(0):
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
        poller = self.pipe_poller()
        while True:
            ready = poller.poll(1000 * (_FLUSH_INTERVAL if self._active else _IDLE_INTERVAL))
            # Text that waits (a partial line, a burst of lines) goes out within the interval, straight from
            # the buffers: never written to a pipe by this thread, the pipes' only reader (a full pipe would
            # block it for good).
            if ready or (self._active and any(stream.pending for stream in self.streams.values())):
                self.flush_streams()


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
