"""``python -s -m sandbox_runner``: the container's main process (under an init that reaps zombies).

Start-up is on the critical path of every cold session, and the interpreter (IPython's import) is
its long pole, so the interpreter is started first, with as little of the runner imported as will
do; the rest of the runner (logging, asyncio, the server) is imported while it starts.
"""

from __future__ import annotations

import contextlib
import os
import site
import sys
from pathlib import Path

from .config import RunnerConfig
from .launch import start_kernel


def make_directories(config: RunnerConfig) -> None:
    """Create the writable directories a read-only image cannot ship (they live on tmpfs)."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    # The interpreter only puts the user site on sys.path if it exists at start-up, so it must
    # exist before the kernel starts for `!pip install` to be importable in the same session.
    # Without its tmpfs (an image run by hand) it cannot be made: then pip says where it cannot write.
    with contextlib.suppress(OSError):
        Path(site.getusersitepackages()).mkdir(parents=True, exist_ok=True)
    for var in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            Path(os.environ[var]).mkdir(parents=True, exist_ok=True)


def seed_matplotlib(config: RunnerConfig) -> None:
    """Copy the image's prebuilt font cache, which spares the first `import matplotlib` a rebuild.

    Done while the interpreter starts: it imports matplotlib only when a cell does, and no cell
    runs before the runner is serving.
    """
    import shutil

    mpl_dir = os.environ.get("MPLCONFIGDIR")
    if mpl_dir and config.mpl_seed_dir.is_dir():
        shutil.copytree(config.mpl_seed_dir, mpl_dir, dirs_exist_ok=True)


def kernel_env(config: RunnerConfig) -> dict[str, str]:
    """The interpreter's environment: ours (which holds no secrets by design) plus its output caps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCI_RUNNER_")}
    env["TCI_KERNEL_MAX_STREAM_BYTES"] = str(config.limits.max_stream_bytes)
    env["TCI_KERNEL_MAX_FRAME_BYTES"] = str(config.limits.max_frame_bytes)
    return env


def configure_logging() -> None:
    """One JSON object per line on stderr: the container log stays machine-readable."""
    import json
    import logging

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            entry = {"ts": record.created, "level": record.levelname.lower(), "event": record.getMessage()}
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            return json.dumps(entry)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=os.environ.get("TCI_RUNNER_LOG_LEVEL", "INFO"), handlers=[handler])


def main() -> None:
    """Entry point."""
    config = RunnerConfig.from_env()
    make_directories(config)
    env = kernel_env(config)
    launched = start_kernel(env, config.workdir)
    # No user code runs before the first cell, so these may follow the interpreter's start.
    from . import procs

    procs.become_subreaper()
    procs.make_undumpable()
    configure_logging()
    seed_matplotlib(config)
    import asyncio
    import contextlib

    # uvloop's loop costs the runner a quarter less CPU per execute than asyncio's own; its import
    # (ssl's with it) overlaps with the interpreter's start.
    import uvloop

    from .server import run

    # SIGTERM cancels run(), which shuts the kernel down first.
    with contextlib.suppress(asyncio.CancelledError), asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(config, env, launched))


if __name__ == "__main__":
    main()
