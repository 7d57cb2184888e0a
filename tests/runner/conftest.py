"""Fixtures that run the real runner agent (and its real IPython kernel) as a subprocess.

Each runner gets its own writable directories under a temporary path and is spoken to through the
orchestrator's ``RunnerClient`` over its stdin/stdout pipes, exactly as over a container's attach
stream. Teardown closes stdin (the runner's signal to exit) and checks that nothing it started
is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.runner_client import RunnerClient

# Generous: the client must accept any reply the runner may legitimately send.
MAX_FRAME = 128 * 1024 * 1024
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every async test and fixture here runs on asyncio (the runner and orchestrator use it)."""
    return "asyncio"


def runner_env(root: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The runner's environment: every writable directory under ``root``, plus ``extra``."""
    skip = ("TCI_", "JPY_", "MPL", "IPYTHON", "JUPYTER")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    dirs = {
        "TCI_RUNNER_WORKDIR": "workspace",
        "IPYTHONDIR": "ipython",
        "JUPYTER_RUNTIME_DIR": "jupyter-runtime",
        "MPLCONFIGDIR": "mplconfig",
        "PYTHONUSERBASE": "userbase",
        "XDG_CACHE_HOME": "cache",
        "HOME": "home",
    }
    for var, name in dirs.items():
        env[var] = str(root / name)
    (root / "home").mkdir(parents=True, exist_ok=True)
    # `!python` inside the kernel must find this interpreter (with matplotlib), not the system one.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TCI_RUNNER_LOG_LEVEL"] = "DEBUG"
    env.update(extra)
    return env


def start_time(pid: int) -> str | None:
    """When ``pid`` started, per /proc (tells a process from a reused pid); None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in {"Z", "X"} else fields[19]


def descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root`` with their start times."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            children.setdefault(int(stat[stat.rfind(")") + 2 :].split()[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        started = start_time(pid)
        if started is not None:
            found[pid] = started
        stack.extend(children.get(pid, []))
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    return start_time(pid) is not None


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting until {what}")
        await asyncio.sleep(0.02)


@dataclass
class Execution:
    """One ``execute`` result, with helpers to pick outputs apart."""

    result: dict[str, Any]

    @property
    def outcome(self) -> str:
        return str(self.result["outcome"])

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return list(self.result["outputs"])

    def of(self, kind: str) -> list[Any]:
        """The ``data`` of every output of type ``kind``."""
        return [o["data"] for o in self.outputs if o["type"] == kind]

    def text(self, kind: str) -> str:
        """All text outputs of type ``kind`` (stdout, stderr, error) joined."""
        return "".join(self.of(kind))


@dataclass
class RunnerHandle:
    """A running runner subprocess and a connected client."""

    client: RunnerClient
    process: asyncio.subprocess.Process
    root: Path
    hello: dict[str, Any]

    @property
    def workdir(self) -> Path:
        return self.root / "workspace"

    async def execute(
        self, code: str, *, timeout: float = 20.0, files: list[dict[str, Any]] | None = None
    ) -> Execution:
        args: dict[str, Any] = {"code": code, "timeout": timeout}
        if files is not None:
            args["files"] = files
        # The reply waits for the kernel's own timeout handling (interrupt grace, restart) too.
        return Execution(await self.client.request("execute", args, timeout=timeout + 60))

    async def stats(self) -> dict[str, Any]:
        return await self.client.request("stats", {}, timeout=10)

    # The process helpers, reachable from tests through the fixture (test modules import nothing from here).
    pid_alive = staticmethod(pid_alive)
    wait_until = staticmethod(wait_until)


@contextlib.asynccontextmanager
async def running_runner(root: Path, **settings: str) -> AsyncIterator[RunnerHandle]:
    """Start ``python -s -m sandbox_runner`` under ``root``; stop it and check for leftovers after."""
    env = runner_env(root, settings)  # creates root
    with (root / "runner.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-s",
            "-m",
            "sandbox_runner",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=root,
            limit=MAX_FRAME,
        )
    assert process.stdin is not None
    assert process.stdout is not None
    client = RunnerClient(process.stdout, process.stdin, max_frame_bytes=MAX_FRAME, name=f"runner-{process.pid}")
    handle: RunnerHandle | None = None
    try:
        hello = await client.connect(timeout=START_TIMEOUT)
        await client.request("ready", {"timeout": START_TIMEOUT}, timeout=START_TIMEOUT + 5)
        handle = RunnerHandle(client, process, root, hello)
        yield handle
    finally:
        await stop_runner(client, process, root / "runner.log")


async def stop_runner(client: RunnerClient, process: asyncio.subprocess.Process, log: Path) -> None:
    """Close the runner's stdin, wait for it to exit, and assert it left no process behind."""
    left = descendants(process.pid)
    await client.close()  # closes the runner's stdin: its cue to shut the kernel down and exit
    try:
        code = await asyncio.wait_for(process.wait(), EXIT_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"the runner did not exit within {EXIT_TIMEOUT:g} s of stdin closing:\n{tail(log)}")
    await wait_until(
        lambda: not any(start_time(pid) == started for pid, started in left.items()),
        EXIT_TIMEOUT,
        f"the runner's processes {sorted(left)} are gone",
    )
    assert code == 0, f"the runner exited with status {code}:\n{tail(log)}"


def tail(log: Path, lines: int = 20) -> str:
    """The end of a runner's log (JSON lines on its stderr), for failure messages."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def start_runner(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunnerHandle]]:
    """``async with start_runner(TCI_RUNNER_X="1") as runner:`` - a runner with extra settings."""

    def start(**settings: str) -> contextlib.AbstractAsyncContextManager[RunnerHandle]:
        return running_runner(tmp_path_factory.mktemp("runner"), **settings)

    return start


@pytest.fixture(scope="module")
async def runner(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunnerHandle]:
    """One runner shared by the tests of a module (tests that do not kill its kernel)."""
    async with running_runner(tmp_path_factory.mktemp("runner")) as handle:
        yield handle


@pytest.fixture
async def fresh_runner(tmp_path: Path) -> AsyncIterator[RunnerHandle]:
    """A runner of this test's own (for tests that kill or wedge the kernel)."""
    async with running_runner(tmp_path) as handle:
        yield handle
