"""Fixtures for the compat suite: the real server on loopback, driven by the official SDKs.

* ``server`` (session scope) runs ``python -m orchestrator`` as a subprocess, once per backend:
  ``local`` always; ``docker`` (marked ``docker``) with its own instance name and test-run label,
  whose containers are all removed at teardown.
* ``sdk`` (per test) runs a client script from ``clients/`` in the virtualenv of the requested
  SDK generation (built on first use under ``.venv-sdk/``), with an API key of its own. Since any
  key is its own tenant in dev mode, the test then owns exactly the sessions it created, and
  removes them afterwards with the ``DELETE`` extension.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

# tests/ is on sys.path (rootdir conftest, no __init__.py), so the helpers in tests/sdk import as `sdk`.
from sdk.harness import SdkRunner, Server
from sdk.venvs import ensure_sdk_venv
from support.package_cache import free_port

SDK_VERSIONS = {"v1": "1.5.35", "v2": "2.42.0"}
SERVER_START_TIMEOUT = 60.0


def _progress(config: pytest.Config) -> Callable[[str], None]:
    """Print straight to the terminal even while pytest captures output."""
    capture = config.pluginmanager.getplugin("capturemanager")

    def log(line: str) -> None:
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(line, flush=True)
        else:
            print(line, flush=True)

    return log


def _remove_test_containers(label_value: str) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        removed = []
        selector = {"label": f"io.tci-orchestrator.test-run={label_value}"}
        for container in client.containers.list(all=True, filters=selector, ignore_removed=True):
            container.remove(force=True)
            removed.append(container.name)
        return removed
    finally:
        client.close()


@pytest.fixture(
    scope="session",
    params=["local", pytest.param("docker", marks=pytest.mark.docker)],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, wait_until: Callable[..., Any]
) -> Iterator[Server]:
    """The real server on a free loopback port, for one backend."""
    backend: str = request.param
    run_id = f"compat-{secrets.token_hex(4)}"
    port = free_port()
    log_path = tmp_path_factory.mktemp(f"server-{backend}") / "server.log"
    # No ORCH_* from the caller's shell, and no PYTEST_* (ipykernel stops capturing fd output under pytest).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "PYTEST_", "TCI_"))}
    env.update(
        ORCH_BACKEND=backend,
        ORCH_POOL_SIZE="1" if backend == "docker" else "0",
        ORCH_LOG_FORMAT="console",
        ORCH_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        # The local backend's `!python` / `!pip` must be this venv's, never the system's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    socket_dir = Path(tempfile.mkdtemp(prefix="tci-compat-"))
    if backend == "docker":
        env.update(ORCH_INSTANCE=run_id, ORCH_TEST_RUN_LABEL=run_id, ORCH_SOCKET_DIR=str(socket_dir))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    srv = Server(backend, f"http://127.0.0.1:{port}", process, log_path)
    try:

        def healthy() -> bool:
            srv.check_alive()
            try:
                return httpx.get(f"{srv.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=SERVER_START_TIMEOUT, message=f"the {backend} server answers /healthz")
        if backend == "docker":
            ready = httpx.get(f"{srv.url}/readyz", timeout=10)
            assert ready.status_code == 200, f"/readyz: {ready.text}\n{srv.log_tail()}"
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if backend == "docker":
            _remove_test_containers(run_id)
        shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def sdk_python(pytestconfig: pytest.Config) -> Callable[[str], Path]:
    """``sdk_python("v1" | "v2")``: the python of that generation's virtualenv (built once)."""
    log = _progress(pytestconfig)

    @cache
    def python_for(generation: str) -> Path:
        return ensure_sdk_venv(SDK_VERSIONS[generation], log)

    return python_for


@pytest.fixture
def sdk(server: Server, sdk_python: Callable[[str], Path]) -> Iterator[SdkRunner]:
    """A client-script runner with a fresh API key; the sessions it made are removed afterwards."""
    runner = SdkRunner(server, sdk_python)
    yield runner
    runner.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the server's log to every failing compat test."""
    report = yield
    srv = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(srv, Server):
        state = "running" if srv.process.poll() is None else f"exited with {srv.process.returncode}"
        report.sections.append((f"{srv.backend} server log ({state}, tail)", srv.log_tail()))
    return report
