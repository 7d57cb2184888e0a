"""Local backend: each sandbox is a runner subprocess on this host, with NO isolation.

For fast tests of everything above the backend, and for hacking without Docker. It runs the real
runner and kernel, so behaviour matches the Docker backend except for limits and isolation.
``Settings`` refuses it in production mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunnerFailure, SandboxStartFailed
from ..models import Claim, SandboxInfo
from ..runner_client import RunnerClient
from ..settings import Settings
from . import labels
from .docker_spec import runner_environment


@dataclass
class _Process:
    info: SandboxInfo
    process: asyncio.subprocess.Process
    root: Path


async def spawn_runner(environment: dict[str, str], *, max_frame_bytes: int) -> tuple[asyncio.subprocess.Process, Path]:
    """Start ``python -m sandbox_runner`` with piped stdio in a fresh private directory tree.

    Returns the process and its root directory (the caller removes it once the process is gone).

    Raises:
        SandboxStartFailed: the process could not be started.
    """
    root = Path(tempfile.mkdtemp(prefix="tci-local-"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "TCI_"))},
        **environment,
        "TCI_RUNNER_WORKDIR": str(root / "workspace"),
        "HOME": str(root / "home"),
        "PYTHONUSERBASE": str(root / "home" / ".local"),
        "IPYTHONDIR": str(root / "home" / ".ipython"),
        "MPLCONFIGDIR": str(root / "home" / ".config" / "matplotlib"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        # The kernel's connection and socket files go with the root when the runner is killed.
        "TMPDIR": str(root / "tmp"),
        # Never the host's own /tmp or /dev/shm: a run lane deletes what appears there during a run.
        "TCI_RUNNER_SCRUB_DIRS": f"{root / 'home'}:{root / 'tmp'}",
    }
    (root / "tmp").mkdir()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-s", "-m", "sandbox_runner",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=max_frame_bytes + 1024,
        )  # fmt: skip
    except OSError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise SandboxStartFailed(f"cannot start a local runner: {exc}") from exc
    return process, root


async def stop_runner(process: asyncio.subprocess.Process, root: Path) -> None:
    """Kill a runner from ``spawn_runner``, wait for it, and remove its directory tree."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
    shutil.rmtree(root, ignore_errors=True)


class LocalBackend:
    """``Backend`` whose sandboxes are ``python -m sandbox_runner`` child processes."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._profile = settings.sandbox.profile_key()
        self._sandboxes: dict[str, _Process] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for sandbox_id in list(self._sandboxes):
            await self.destroy(sandbox_id)

    async def ping(self) -> None:
        return None

    async def image_present(self) -> bool:
        return True

    async def create(self, claim: Claim | None) -> SandboxInfo:
        process, root = await spawn_runner(
            runner_environment(self._settings.sandbox), max_frame_bytes=self._settings.max_frame_bytes
        )
        instance = self._settings.instance
        name = labels.claimed_name(instance, claim) if claim else labels.pool_name(instance)
        info = SandboxInfo(f"local-{process.pid}", name, True, time.time(), self._profile, claim)
        self._sandboxes[info.sandbox_id] = _Process(info, process, root)
        return info

    async def connect(self, sandbox: SandboxInfo, timeout: float) -> RunnerClient:
        entry = self._sandboxes.get(sandbox.sandbox_id)
        if entry is None or entry.process.returncode is not None:
            raise RunnerFailure(f"local sandbox {sandbox.sandbox_id} is not running")
        assert entry.process.stdout is not None
        assert entry.process.stdin is not None
        client = RunnerClient(
            entry.process.stdout, entry.process.stdin, max_frame_bytes=self._settings.max_frame_bytes, name=sandbox.name
        )
        await client.connect(timeout)
        return client

    async def claim(self, sandbox: SandboxInfo, claim: Claim) -> SandboxInfo:
        entry = self._sandboxes.get(sandbox.sandbox_id)
        if entry is None:
            raise SandboxStartFailed("local sandbox is gone")
        entry.info = SandboxInfo(
            sandbox.sandbox_id,
            labels.claimed_name(self._settings.instance, claim),
            True,
            sandbox.created_at,
            sandbox.profile,
            claim,
        )
        return entry.info

    async def list(self) -> list[SandboxInfo]:
        found = []
        for entry in self._sandboxes.values():
            info = entry.info
            running = entry.process.returncode is None
            found.append(SandboxInfo(info.sandbox_id, info.name, running, info.created_at, info.profile, info.claim))
        return found

    async def destroy(self, sandbox_id: str) -> None:
        entry = self._sandboxes.pop(sandbox_id, None)
        if entry is not None:
            await stop_runner(entry.process, entry.root)
