"""IPython extension loaded into the kernel: caps stdout/stderr at the source.

ipykernel routes every write to ``sys.stdout``/``sys.stderr`` through ``OutStream.write``, including
bytes written to file descriptors 1 and 2 by subprocesses and C code (its pipe watcher calls
``write``). Wrapping ``write`` therefore drops excess output inside the producer, before it is
buffered or sent. At the end of each execute, once fd-level output has been drained, the dropped
byte counts are published once, under a private MIME type that the runner consumes and never
returns to the caller. Once a stream has dropped bytes it keeps nothing more in that execute, so
what the caller sees is always a prefix of the output followed by the runner's marker.

It also runs ``!cmd`` shell escapes over plain pipes instead of IPython's pseudo-terminal, so
their output keeps ``\n`` line endings and stderr stays apart from stdout.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from sandbox_runner.outputs import TRUNCATION_MIME

_STREAMS = ("stdout", "stderr")
# Processes the kernel starts run below the kernel (and far below the runner): a busy background
# process cannot starve the cell that started it, nor the interrupt that stops it.
_CHILD_NICE = 19
# A running shell escape is checked this often for its exit (its pipes may outlive it).
_SHELL_POLL = 0.05
# Reads of what a shell escape left in its pipes before the rest is handed to a thread.
_DRAIN_READS = 64
# Upper bound on waiting for fd-level output at the end of a cell (a writer that never stops).
_DRAIN_SECONDS = 1.0
# What ipykernel's pipe thread may hold between reading fd output and writing it: one read
# (1000 bytes) whose invalid bytes each become a 3-byte replacement character.
_IN_FLIGHT_BYTES = 4096


class _Caps:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        # ipykernel's OutStreams, kept here because user code may rebind sys.stdout and sys.stderr.
        self.streams: list[Any] = []
        self.used = dict.fromkeys(_STREAMS, 0)
        self.dropped = dict.fromkeys(_STREAMS, 0)
        self.lock = threading.Lock()

    def reset(self, *_: Any) -> None:
        with self.lock:
            self.used = dict.fromkeys(_STREAMS, 0)
            self.dropped = dict.fromkeys(_STREAMS, 0)

    def wrap(self, name: str, write: Callable[[str], Any]) -> Callable[[str], Any]:
        def capped_write(text: str) -> Any:
            if not isinstance(text, str):
                return write(text)  # let OutStream raise its own TypeError
            data = text.encode("utf-8", errors="replace")
            with self.lock:
                # Once something was dropped nothing more is kept: the output stays a prefix.
                room = 0 if self.dropped[name] else self.cap - self.used[name]
                if len(data) <= room:
                    self.used[name] += len(data)
                    keep = text
                else:
                    kept = data[: max(room, 0)].decode("utf-8", errors="ignore")
                    kept_len = len(kept.encode("utf-8", errors="replace"))
                    self.used[name] += kept_len
                    self.dropped[name] += len(data) - kept_len
                    keep = kept
            if keep:
                write(keep)
            return len(text)

        return capped_write

    def report(self, *_: Any) -> None:
        if not self._may_drop_late_output():
            # ipykernel flushes both streams itself before it replies; waiting for fd-level output
            # only matters when what is still on its way could overflow a cap.
            return
        _drain_fd_output(self.streams)
        with self.lock:
            dropped = {name: count for name, count in self.dropped.items() if count}
        if not dropped:
            return
        from IPython.display import publish_display_data

        publish_display_data({TRUNCATION_MIME: dropped})  # type: ignore[no-untyped-call]

    def _may_drop_late_output(self) -> bool:
        with self.lock:
            if any(self.dropped.values()):
                return True
            used = dict(self.used)
        return any(
            used[name] + _fd_backlog(stream) + _IN_FLIGHT_BYTES > self.cap
            for name, stream in zip(_STREAMS, self.streams, strict=True)
        )


def _fd_backlog(stream: Any) -> int:
    """Bytes of fd-level output waiting in ``stream``'s pipe; 0 when its fds are not watched."""
    fd = getattr(stream, "_fid", None)  # ipykernel's read end of the pipe, None if not watched
    if not isinstance(fd, int):
        return 0
    try:
        count = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", count)[0])


def _drain_fd_output(streams: list[Any]) -> None:
    """Wait until output written to file descriptors 1 and 2 has gone through ``write``, then send it.

    ipykernel moves fd-level output (subprocesses, C code, ``os.write``) from a pipe to
    ``OutStream.write`` in a thread of its own that nothing waits for, so output written just
    before the cell ends could be counted after the report, or sent after the execute is over.
    """
    deadline = time.monotonic() + _DRAIN_SECONDS
    for stream in streams:
        while _fd_backlog(stream) and time.monotonic() < deadline:
            time.sleep(0.001)
        # flush() waits for the I/O thread, which lets the pipe thread write what it read last.
        stream.flush()


def _piped_system(cmd: str) -> int:
    """Run a shell command, streaming its stdout and stderr into the cell's output.

    The command is over when the shell exits, even if processes it put in the background still hold
    its pipes (``!server &``): what they print from then on is forwarded by a thread of its own, and
    the runner stops them when the execute ends.
    """
    proc = subprocess.Popen(  # noqa: S602 - a shell escape is a shell command by definition
        cmd,
        shell=True,
        executable="/bin/sh",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # Lowered before exec (one system call, so safe beside the kernel's threads): a quick command
        # would otherwise have run, or forked, before the Popen hook lowers it.
        preexec_fn=_lower_priority,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    selector = selectors.DefaultSelector()
    for pipe, target in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
        selector.register(pipe, selectors.EVENT_READ, (target, codecs.getincrementaldecoder("utf-8")("replace")))
    handed_off = False
    try:
        while selector.get_map() and proc.poll() is None:
            _forward(selector, _SHELL_POLL)
        # The shell is gone: what it wrote is in the pipes already; anything after that is the background's.
        for _ in range(_DRAIN_READS):
            if not selector.get_map() or not _forward(selector, 0):
                break
        if selector.get_map():
            with contextlib.suppress(RuntimeError):  # no thread to spare (a bomb): their output is dropped
                threading.Thread(target=_forward_until_closed, args=(selector,), daemon=True).start()
                handed_off = True
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    finally:
        if not handed_off:
            _close(selector)


def _forward(selector: selectors.BaseSelector, timeout: float | None) -> bool:
    """Copy what is readable within ``timeout`` to its stream; whether anything was."""
    events = selector.select(timeout)
    for key, _ in events:
        target, decoder = key.data
        chunk = os.read(key.fd, 65536)
        if chunk:
            target.write(decoder.decode(chunk))
        else:
            target.write(decoder.decode(b"", final=True))
            selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
    return bool(events)


def _forward_until_closed(selector: selectors.BaseSelector) -> None:
    try:
        while selector.get_map():
            _forward(selector, None)
    except (OSError, ValueError):
        pass
    finally:
        _close(selector)


def _close(selector: selectors.BaseSelector) -> None:
    for key in list(selector.get_map().values()):
        selector.unregister(key.fileobj)
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()


def _system_piped(shell: Any, cmd: str) -> None:
    """``!cmd``: ipykernel's ``system_piped`` over ``_piped_system``, which also takes ``cmd &``.

    ipykernel refuses a command ending in ``&`` because its pipes would keep the cell open; here the
    cell goes on once the shell exits, so agents can start servers the way they do in a terminal.
    """
    # depth=1: names in the cell's frame (a function's locals) expand as in ipykernel's own method.
    exit_code = _piped_system(shell.var_expand(cmd, depth=1))
    shell.user_ns["_exit_code"] = exit_code
    if getattr(shell, "system_raise_on_error", False) and exit_code != 0:
        raise subprocess.CalledProcessError(exit_code, cmd)


# Process handles user code still holds: their exit status is theirs to collect.
_handles: weakref.WeakSet[Any] = weakref.WeakSet()


def _track_handles(cls: Any) -> None:
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _handles.add(self)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self.pid, _CHILD_NICE)

    cls.__init__ = __init__


def _reap_children(*_: Any) -> None:
    """Collect children the runner killed after the previous execute (they are zombies until then).

    Every child of the kernel is killed when its execute ends (the runner's leftover policy), so a
    zombie child left at the start of the next execute has no one else to wait for it, unless a
    ``subprocess.Popen`` or ``multiprocessing`` handle still owns it: those report ``-9`` themselves.
    """
    try:
        # One syscall in the common case: no child has exited, so there is nothing to collect.
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return
    except ChildProcessError:
        return  # no children at all
    owned = {handle.pid for handle in list(_handles) if getattr(handle, "returncode", None) is None}
    me = os.getpid()
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return  # no file descriptor to spare: the runner restarts such a kernel
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in owned:
            continue
        try:
            stat = open(f"/proc/{entry.name}/stat").read()  # noqa: SIM115 - one tiny read
        except OSError:
            continue
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state == "Z" and int(ppid) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, _CHILD_NICE)


def load_ipython_extension(ip: Any) -> None:
    """Entry point IPython calls when the kernel starts with this extension."""
    if "debugpy" in sys.modules and sys.modules["debugpy"] is None:
        del sys.modules["debugpy"]  # blocked by kernel_launcher while the kernel was built
    caps = _Caps(int(os.environ.get("TCI_KERNEL_MAX_STREAM_BYTES", str(1024 * 1024))))
    for name in _STREAMS:
        stream = getattr(sys, name)
        stream.write = caps.wrap(name, stream.write)
        caps.streams.append(stream)
    # ipykernel names every cell after a file in the temporary directory, and finding that directory
    # writes a probe file there: a kernel restarted while /tmp is full could run no cell at all.
    with contextlib.suppress(FileNotFoundError):
        tempfile.gettempdir()
    tempfile.tempdir = tempfile.tempdir or "/tmp"
    # ipykernel opens a socket per thread on its first output; the main thread's opens now, so that
    # code which uses up every file descriptor can still print.
    sys.stdout.flush()
    # Instance attributes: the class binds `system` to its own `system_piped`.
    ip.system = ip.system_piped = types.MethodType(_system_piped, ip)
    import multiprocessing.popen_fork

    os.register_at_fork(after_in_child=_lower_priority)
    _track_handles(subprocess.Popen)
    _track_handles(multiprocessing.popen_fork.Popen)
    ip.events.register("pre_execute", _reap_children)
    ip.events.register("pre_execute", caps.reset)
    ip.events.register("post_execute", caps.report)
