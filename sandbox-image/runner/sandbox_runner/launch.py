"""Starting the interpreter process, with nothing but the standard library imported.

The runner starts its first interpreter before it imports asyncio and the rest of itself, so that
the interpreter's own start-up (importing IPython) overlaps with them. The two ends of a socketpair
join them: the interpreter gets its end as an inherited file descriptor, the runner keeps the other.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LaunchedKernel:
    """An interpreter process and the runner's end of its socket."""

    process: subprocess.Popen[bytes]
    sock: socket.socket
    started_at: float
    """``time.monotonic()`` when the process was started."""

    def discard(self) -> None:
        """Close the runner's end of the socket (the process must be gone)."""
        self.sock.close()


def start_kernel(env: dict[str, str], cwd: Path) -> LaunchedKernel:
    """Start the interpreter (``sandbox_runner.interpreter``) in a session of its own; returns at once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandbox_runner.interpreter", str(theirs.fileno())],
            env=env,
            cwd=cwd,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            # The runner's own stdout may be the protocol channel: the interpreter must never inherit it.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: an interrupt reaches it and what it runs, never the runner.
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return LaunchedKernel(process, ours, time.monotonic())
