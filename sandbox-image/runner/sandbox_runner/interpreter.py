"""The interpreter process: ``python -m sandbox_runner.interpreter FD``, one per session, started by the runner.

It runs cells in IPython's ``InteractiveShell`` and speaks to the runner over the socket ``FD`` with
the runner protocol's framing, instead of Jupyter's messaging (ZeroMQ sockets, signed messages, an
I/O thread, five messages per execute). Requests are ``{"cell": n, "code": str}``, one at a time;
replies are the outputs as ``{"type": ...}`` frames, then ``{"type": "done", "cell": n, ...}``
(PROTOCOL.md, "Interpreter"). ``SIGINT`` interrupts a running cell and is ignored between cells.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from typing import Any, Final

# The runner stays at the default priority, so that however busy user code keeps the CPU, the runner
# still gets its turn to stop it; the interpreter's own children go lower still (shell.CHILD_NICE).
KERNEL_NICE: Final = 10


def main() -> None:
    """Entry point."""
    os.nice(KERNEL_NICE)  # before any thread exists: niceness is per thread, and threads inherit it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = int(sys.argv[1])
    # As in a Jupyter kernel, the working directory (whatever it is now) comes first on sys.path; unlike
    # one, sys.argv holds no launcher arguments, so argparse in a cell sees none.
    sys.argv = [""]
    sys.path[0] = ""
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    max_stream = int(os.environ.pop("TCI_KERNEL_MAX_STREAM_BYTES", str(1024 * 1024)))
    max_frame = int(os.environ.pop("TCI_KERNEL_MAX_FRAME_BYTES", str(16 * 1024 * 1024)))

    from . import shell as shell_module
    from .capture import Capture
    from .channel import InterpreterChannel

    channel = InterpreterChannel(socket.socket(fileno=fd), max_frame)
    capture = Capture(channel, max_stream)
    sys.stdout, sys.stderr = capture.streams["stdout"], capture.streams["stderr"]
    shell = shell_module.build(capture)
    channel.send({"type": "ready", "pid": os.getpid()})
    while (request := channel.receive()) is not None:
        cell, code = request.get("cell"), request.get("code")
        if not isinstance(code, str):
            continue
        for name in ("stdout", "stderr"):
            # IPython writes through sys.stdout around every cell: a cell's ``sys.stdout = None``
            # would fail every later cell before it starts.
            if getattr(sys, name) is None:
                setattr(sys, name, capture.streams[name])
        capture.begin()
        _run_cell(shell, code)
        shell.forget_cell_record()
        dropped = capture.end()
        channel.send(
            {
                "type": "done",
                "cell": cell,
                "execution_count": shell.execution_count - 1,
                "dropped": dropped,
                "exit": bool(shell.exit_now),
            }
        )
        if shell.exit_now:
            break  # exit() / quit(): the runner starts a new interpreter


def _run_cell(shell: Any, code: str) -> None:
    """Run one cell with SIGINT armed; an interrupt that lands outside the cell's own handling is an error too.

    Every error the cell raised is sent as an ``error`` output, even one IPython could not format (it
    prints a fallback instead) or one raised by IPython's own machinery around the cell (a shell method
    the cell replaced): the cell failed, the interpreter and its state go on.
    """
    shell.error_sent = False
    try:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            result = shell.run_cell(code, store_history=True)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt as exc:
        # Outside the cell's own code (IPython reports those): most often while IPython was still reading
        # a long cell, which then never ran; said, so that the execute is not taken for a success.
        if not shell.error_sent:
            _send_error(shell, exc)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - IPython failing around the cell ends the cell only
        # (a SystemExit gets here only from IPython's own machinery, a post_run_cell callback's say: the
        # cell's own is shown by IPython; exit() and quit() end the interpreter through exit_now)
        _send_error(shell, exc)
    else:
        error = getattr(result, "error_before_exec", None) or getattr(result, "error_in_exec", None)
        if isinstance(error, BaseException) and not shell.error_sent and not _shown_otherwise(shell, error):
            _send_error(shell, error)
    while signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:
            continue


def _shown_otherwise(shell: Any, error: BaseException) -> bool:
    """Errors IPython reports without a traceback on purpose, as a Jupyter kernel does: a usage error
    (an unknown magic) is a line on stderr, leaving the debugger says nothing, and an exception the
    cell registered a handler for (``set_custom_exc``) is that handler's to show."""
    from bdb import BdbQuit

    from IPython.core.error import UsageError

    custom = tuple(getattr(shell, "custom_exceptions", ()) or ())
    return isinstance(error, (UsageError, BdbQuit, *custom))


def _send_error(shell: Any, exc: BaseException) -> None:
    """Send ``exc`` as the cell's error output, formatted plainly (the cell may have broken IPython's way)."""
    limit = sys.getrecursionlimit()
    try:
        # The cell may have left a recursion limit too low to format anything.
        sys.setrecursionlimit(max(limit, 1000))
        try:
            evalue = str(exc)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error
            evalue = f"<unprintable {type(exc).__name__} object>"
        # Lines, as IPython's own tracebacks are sent (format_exception's items end in newlines).
        stb = "".join(traceback.format_exception(exc)).rstrip("\n").split("\n")
    except Exception:  # noqa: BLE001 - the error is still sent, without its traceback
        evalue, stb = "", []
    finally:
        sys.setrecursionlimit(limit)
    shell.send_error(type(exc).__name__, evalue, stb)


if __name__ == "__main__":
    main()
