"""Stopping early on Ctrl-C or SIGTERM without waiting for long measurements to finish.

Blocking measurements run in worker threads, which a signal cannot interrupt, and
``asyncio.run`` waits for them before it returns. So the signal handler sets a flag that
their loops check between repetitions (``checkpoint``), kills the child processes they wait on
(``run_child``), and raises ``KeyboardInterrupt`` in the main thread. Whatever those children
leave on the engine carries the run label and goes with the final cleanup.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Sequence
from types import FrameType

_stop = threading.Event()
_children: set[subprocess.Popen[str]] = set()
_lock = threading.Lock()


def checkpoint() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was requested (call between repetitions)."""
    if _stop.is_set():
        raise KeyboardInterrupt


def _request_stop(signum: int, frame: FrameType | None) -> None:
    _stop.set()
    with _lock:
        for child in _children:
            child.kill()
    raise KeyboardInterrupt


def install() -> None:
    """Handle SIGINT and SIGTERM (before ``asyncio.run``, which then leaves SIGINT to us)."""
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


def run_child(argv: Sequence[str], *, timeout: float, capture_stderr: bool = True) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` (text, stdout captured) whose child a stop request kills."""
    checkpoint()
    stderr = subprocess.PIPE if capture_stderr else None
    with subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True) as child:
        with _lock:
            _children.add(child)
        try:
            stdout, errors = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
        finally:
            with _lock:
                _children.discard(child)
    checkpoint()
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, errors)
