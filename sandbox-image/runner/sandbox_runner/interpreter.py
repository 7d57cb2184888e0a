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
        capture.begin()
        _run_cell(shell, code)
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
    """Run one cell with SIGINT armed; an interrupt that lands outside the cell's own handling is dropped."""
    try:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            shell.run_cell(code, store_history=True)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt:
        pass
    while signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    main()
