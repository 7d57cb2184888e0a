"""Fixtures for tests that need the real Docker Engine and the sandbox image.

They fail (not skip) when Docker or the image is missing and ``CI`` or ``ORCH_TEST_REQUIRE_DOCKER``
is set, so a CI that should have Docker cannot go green without it. testcontainers' reaper
cannot be pulled where no registry is reachable, so cleanup goes by our own test-run label.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import uvicorn
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends import labels, library
from orchestrator.backends.channel import instance_dir
from orchestrator.settings import SandboxSettings, Settings

IMAGE = os.environ.get("ORCH_SANDBOX__IMAGE", "tci-sandbox:latest")
AUTH = {"Authorization": "Bearer sk-integration"}
# Parallel checkouts sharing one engine set their own prefix so they never sweep each other's containers.
RUN_PREFIX = os.environ.get("ORCH_TEST_RUN_PREFIX", "it")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") or os.environ.get("ORCH_TEST_REQUIRE_DOCKER"):
        pytest.fail(f"Docker is required here: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        _unavailable(f"no Docker Engine: {exc}")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"sandbox image {IMAGE} is missing: run `make image`")
    # Every sandbox of the suite alike (`make test` has filled the set already; this is for bare pytest).
    library.prepare(client, IMAGE)
    # Containers of this suite's crashed earlier runs (other suites use other prefixes).
    for container in client.containers.list(all=True, filters={"label": labels.TEST_RUN}, ignore_removed=True):
        if container.labels.get(labels.TEST_RUN, "").startswith(RUN_PREFIX):
            remove_labelled(client, f"{labels.TEST_RUN}={container.labels[labels.TEST_RUN]}")
    yield client
    client.close()


def remove_labelled(client: docker.DockerClient, label: str) -> None:
    for container in client.containers.list(all=True, filters={"label": label}, ignore_removed=True):
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # "removal already in progress": the reaper got there first
                raise


@pytest.fixture
def run_id(docker_client: docker.DockerClient) -> Iterator[str]:
    """A unique instance name per test; every container it creates is removed afterwards."""
    value = RUN_PREFIX + secrets.token_hex(6)
    yield value
    remove_labelled(docker_client, f"{labels.TEST_RUN}={value}")
    shutil.rmtree(socket_dir(value), ignore_errors=True)


def socket_dir(run_id: str) -> Path:
    """Where this run's sandboxes have their runner sockets (the default ``socket_dir``)."""
    return instance_dir(Settings.model_fields["socket_dir"].get_default(call_default_factory=True), run_id)


def docker_settings(run_id: str, **overrides: Any) -> Settings:
    """Settings for a server on the real engine and image, labelled ``run_id``: no pool, no background
    reaping, unless ``overrides`` say otherwise (``sandbox`` is a dict of sandbox settings)."""
    sandbox = SandboxSettings(**{"image": IMAGE, **overrides.pop("sandbox", {})})
    defaults: dict[str, Any] = {"pool_size": 0, "reaper_interval_seconds": 3600, "log_format": "console"}
    return Settings(
        backend="docker", instance=run_id, test_run_label=run_id, sandbox=sandbox, **{**defaults, **overrides}
    )


@pytest.fixture
def make_settings(run_id: str) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return docker_settings(run_id, **overrides)

    return factory


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(execute_timeout_seconds=20))) as client:
        yield client


@contextlib.contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread; its base URL.

    For what the in-process TestClient cannot show: a response read while it is still being
    streamed, a client that disconnects, a real HTTP client (MCP, a browser).
    """
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), 60, "the live server to start")
        assert server.started, "the live server failed to start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def our_containers(client: docker.DockerClient, run_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"{labels.INSTANCE}={run_id}"}, ignore_removed=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def execute(api: TestClient, code: str, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "language": "python", **extra}
    if session_id:
        body["session_id"] = session_id
    response = api.post("/v1/tci/execute", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def text_of(data: dict[str, Any], kind: str) -> str:
    return "".join(o["data"] for o in data["outputs"] if o["type"] == kind)
