"""Starting the kernel process, with nothing but the standard library imported.

The runner starts its first kernel before it imports jupyter_client and pyzmq (a third of a second
of imports), so that the kernel's own start-up overlaps with them. That is also why the connection
file is written here rather than by ``jupyter_client.connect``: importing any part of jupyter_client
imports all of it. The file follows the Jupyter messaging spec; the ``ipc`` transport needs no
ports, and the kernel's sockets live in a private temporary directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

_CHANNELS: Final = ("shell", "iopub", "stdin", "control", "hb")
KERNEL_ARGS: Final = (
    "--HistoryManager.enabled=False",
    "--IPKernelApp.extensions=sandbox_runner.kernel_ext",
    "--Completer.use_jedi=False",
)


@dataclass
class LaunchedKernel:
    """A kernel process and how to reach it."""

    process: subprocess.Popen[bytes]
    connection: dict[str, Any]
    directory: Path
    started_at: float
    """``time.monotonic()`` when the process was started."""

    def discard(self) -> None:
        """Remove the connection file and socket files (the process must be gone)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def connection_info(directory: Path) -> dict[str, Any]:
    """A fresh connection: ``ipc`` endpoints ``<directory>/kernel-<n>`` and a new signing key."""
    return {
        "transport": "ipc",
        "ip": str(directory / "kernel"),
        **{f"{name}_port": number for number, name in enumerate(_CHANNELS, start=1)},
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "python3",
    }


def start_kernel(env: dict[str, str], cwd: Path) -> LaunchedKernel:
    """Start the kernel (``kernel_launcher``) in a session of its own; returns at once."""
    directory = Path(tempfile.mkdtemp(prefix="tci-kernel-"))
    connection = connection_info(directory)
    connection_file = directory / "connection.json"
    fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(connection, handle)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandbox_runner.kernel_launcher", "-f", str(connection_file), *KERNEL_ARGS],
            # ipykernel exits on its own once this parent is gone (as with jupyter_client's launcher).
            env={**env, "JPY_PARENT_PID": str(os.getpid())},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            # The runner's own stdout may be the protocol channel: the kernel must never inherit it.
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: an interrupt reaches it and what it runs, never the runner.
            start_new_session=True,
        )
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return LaunchedKernel(process, connection, directory, time.monotonic())
