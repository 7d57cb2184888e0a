"""``python -s -m sandbox_runner``: the container's main process (under an init that reaps zombies)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import site
import sys
from pathlib import Path

from . import procs
from .config import RunnerConfig
from .launch import start_kernel


def prepare_home(config: RunnerConfig) -> None:
    """Create the writable directories a read-only image cannot ship (they live on tmpfs)."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    # The interpreter only puts the user site on sys.path if it exists at start-up, so it must
    # exist before the kernel starts for `!pip install` to be importable in the same session.
    Path(site.getusersitepackages()).mkdir(parents=True, exist_ok=True)
    for var in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    mpl_dir = os.environ.get("MPLCONFIGDIR")
    if mpl_dir and config.mpl_seed_dir.is_dir():
        # A prebuilt font cache spares the first `import matplotlib` a multi-second rebuild.
        shutil.copytree(config.mpl_seed_dir, mpl_dir, dirs_exist_ok=True)


def kernel_env(config: RunnerConfig) -> dict[str, str]:
    """The interpreter's environment: ours (which holds no secrets by design) plus its output caps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCI_RUNNER_")}
    env["TCI_KERNEL_MAX_STREAM_BYTES"] = str(config.limits.max_stream_bytes)
    env["TCI_KERNEL_MAX_FRAME_BYTES"] = str(config.limits.max_frame_bytes)
    return env


class _JsonFormatter(logging.Formatter):
    """One JSON object per line on stderr: the container log stays machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": record.created, "level": record.levelname.lower(), "event": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main() -> None:
    """Entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=os.environ.get("TCI_RUNNER_LOG_LEVEL", "INFO"), handlers=[handler])
    config = RunnerConfig.from_env()
    procs.become_subreaper()
    procs.make_undumpable()
    prepare_home(config)
    env = kernel_env(config)
    # The interpreter starts now, while the rest of the runner (asyncio and the server) is imported.
    launched = start_kernel(env, config.workdir)
    import asyncio

    from .server import run

    with contextlib.suppress(asyncio.CancelledError):  # SIGTERM; run() has shut the kernel down
        asyncio.run(run(config, env, launched))


if __name__ == "__main__":
    main()
