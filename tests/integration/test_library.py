"""Library volumes on the real engine: filled once per image, mounted read-only, repaired, swept."""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends import library
from orchestrator.backends.docker import DockerBackend

from .conftest import IMAGE, execute, text_of

pytestmark = pytest.mark.docker

# The image the sandbox image is built on (`make image` builds it first): small, so tests are quick.
BASE_IMAGE = os.environ.get("ORCH_TEST_BASE_IMAGE", "tci-base:bookworm")
TREES = "/usr/share/zoneinfo:/etc/apt"
MOUNTS_PROBE = """
import numpy, os
mounts = {line.split()[4]: line.split()[5] for line in open("/proc/self/mountinfo")}
print(mounts.get("/usr/lib/python3.11"), mounts.get("/opt/venv"), numpy.__file__.startswith("/opt/venv/"))
try:
    open("/opt/venv/planted.py", "w")
except OSError as exc:
    print(type(exc).__name__)
"""


@pytest.fixture
def small_image(docker_client: docker.DockerClient) -> Iterator[library.Library]:
    """The base image naming two of its small trees; removed, with its volumes, afterwards."""
    tag = f"tci-librarytest:{secrets.token_hex(4)}"
    dockerfile = f'FROM {BASE_IMAGE}\nLABEL {library.PATHS_LABEL}="{TREES}"\n'
    image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    wanted = library.plan(image.attrs)
    assert wanted is not None
    yield wanted
    with contextlib.suppress(docker.errors.ImageNotFound):  # the sweep's test removes it itself
        docker_client.images.remove(tag, force=True)
    for volume in wanted.names:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.volumes.get(volume).remove(force=True)


def listing(client: docker.DockerClient, volume: str) -> str:
    output: bytes = client.containers.run(
        BASE_IMAGE,
        entrypoint=["ls", "-a", "/v"],
        volumes={volume: {"bind": "/v", "mode": "ro"}},
        network_mode="none",
        remove=True,
    )
    return output.decode()


def in_volume(client: docker.DockerClient, volume: str, command: str) -> None:
    """Run a shell ``command`` with ``volume`` mounted writable at /v."""
    client.containers.run(
        BASE_IMAGE,
        entrypoint=["sh", "-c", command],
        volumes={volume: {"bind": "/v", "mode": "rw"}},
        network_mode="none",
        remove=True,
    )


def test_sessions_import_from_read_only_library_volumes(api: TestClient) -> None:
    data = execute(api, MOUNTS_PROBE)
    assert text_of(data, "stdout").split() == ["ro,relatime", "ro,relatime", "True", "OSError"]


def test_sessions_without_library_volumes_when_turned_off(make_settings: Any) -> None:
    with TestClient(create_app(make_settings(sandbox={"library_volumes": False}))) as api:
        data = execute(api, MOUNTS_PROBE)
    assert text_of(data, "stdout").split()[:2] == ["None", "None"]


def test_fill_copies_the_trees_once_and_replaces_a_half_filled_set(
    docker_client: docker.DockerClient, small_image: library.Library
) -> None:
    # What a fill that died half-way leaves: volumes the engine would not copy into again.
    docker_client.volumes.create(small_image.volumes[0]).remove()
    in_volume(docker_client, small_image.volumes[0], "touch /v/stale")
    assert not library.complete(docker_client, small_image)
    library.fill(docker_client, small_image, wait_seconds=60)
    assert library.complete(docker_client, small_image)
    first = listing(docker_client, small_image.volumes[0])
    assert "stale" not in first
    assert "Europe" in first
    assert "sources.list.d" in listing(docker_client, small_image.volumes[1])
    # Complete: a second fill changes nothing.
    created = docker_client.volumes.get(small_image.marker).attrs["CreatedAt"]
    library.fill(docker_client, small_image, wait_seconds=60)
    assert docker_client.volumes.get(small_image.marker).attrs["CreatedAt"] == created
    # What a fill checks before it marks the set complete: a copy that left a directory out is told apart.
    assert library.compare(docker_client, small_image) is None
    in_volume(docker_client, small_image.volumes[0], "rm -r /v/Europe")
    difference = library.compare(docker_client, small_image)
    assert difference is not None
    assert "/usr/share/zoneinfo/Europe" in difference


def test_concurrent_fills_wait_for_one_another(
    docker_client: docker.DockerClient, small_image: library.Library
) -> None:
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            library.fill(docker.from_env(), small_image, wait_seconds=120)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fill) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert errors == []
    assert library.complete(docker_client, small_image)
    assert "Europe" in listing(docker_client, small_image.volumes[0])


def test_a_lock_left_by_a_dead_filler(
    docker_client: docker.DockerClient, small_image: library.Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = docker_client.containers.create(small_image.image_id, name=small_image.filler, network_mode="none")
    try:
        # A fresh lock is another filler at work: waited for, not taken.
        with pytest.raises(TimeoutError):
            library.fill(docker_client, small_image, wait_seconds=3)
        assert docker_client.containers.get(lock.id)
        # One older than any fill takes is a dead filler's: taken over.
        monkeypatch.setattr(library, "_lock_age", lambda client, wanted: 10**6)
        library.fill(docker_client, small_image, wait_seconds=60)
        assert library.complete(docker_client, small_image)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            lock.remove(force=True)


def test_sweep_removes_the_volumes_of_images_that_are_gone(
    docker_client: docker.DockerClient, small_image: library.Library
) -> None:
    library.fill(docker_client, small_image, wait_seconds=60)
    docker_client.images.remove(small_image.image_id, force=True)
    removed = library.sweep(docker_client)
    assert set(removed) >= set(small_image.names)
    assert not any(library._exists(docker_client, volume) for volume in small_image.names)
    # The sandbox image's own set stays.
    wanted = library.plan(docker_client.images.get(IMAGE).attrs)
    assert wanted is not None
    assert library.complete(docker_client, wanted)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_rebuilt_image_never_mounts_the_old_images_trees(
    docker_client: docker.DockerClient,
    small_image: library.Library,
    make_settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [tag] = docker_client.images.get(small_image.image_id).tags
    library.fill(docker_client, small_image, wait_seconds=60)
    backend = DockerBackend(make_settings(sandbox={"image": tag}))
    await backend.start()
    made: list[str] = []
    renewed: library.Library | None = None

    async def image_and_volumes() -> tuple[str, set[str]]:
        sandbox = await backend.create_stopped(None)
        made.append(sandbox.sandbox_id)
        attrs = docker_client.api.inspect_container(sandbox.sandbox_id)
        return attrs["Image"], {m["Name"] for m in attrs["Mounts"] if m["Type"] == "volume"}

    try:
        assert await image_and_volumes() == (small_image.image_id, set(small_image.volumes))
        # The tag moves to a rebuilt image: its sandboxes go without until its own set is filled.
        dockerfile = f'FROM {small_image.image_id}\nLABEL rebuilt="1"\n'
        rebuilt, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        monkeypatch.setattr("orchestrator.backends.docker._LIBRARY_RECHECK_SECONDS", 0.0)
        image_id, volumes = await image_and_volumes()
        assert image_id == rebuilt.id
        assert not volumes & set(small_image.volumes)
        assert await backend.library_ready(120)
        renewed = library.plan(rebuilt.attrs)
        assert renewed is not None
        assert await image_and_volumes() == (rebuilt.id, set(renewed.volumes))
    finally:
        for sandbox_id in made:
            await backend.destroy(sandbox_id)
        await backend.close()
        docker_client.images.remove(tag, force=True)
        for volume in renewed.names if renewed is not None else ():
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.volumes.get(volume).remove(force=True)


@pytest.mark.anyio
async def test_an_image_built_after_start_gets_its_library(
    docker_client: docker.DockerClient, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make up` before the image exists, then a build: sandboxes use the volumes without a restart.
    tag = f"tci-librarytest:{secrets.token_hex(4)}"
    backend = DockerBackend(make_settings(sandbox={"image": tag}))
    await backend.start()
    wanted: library.Library | None = None
    made: list[str] = []
    try:
        assert not await backend.library_ready(0)
        dockerfile = f'FROM {BASE_IMAGE}\nLABEL {library.PATHS_LABEL}="{TREES}"\n'
        image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        wanted = library.plan(image.attrs)
        assert wanted is not None
        monkeypatch.setattr("orchestrator.backends.docker._LIBRARY_RETRY_SECONDS", 0.0)
        made.append((await backend.create_stopped(None)).sandbox_id)  # sets the fill going
        assert await backend.library_ready(120)
        sandbox = await backend.create_stopped(None)
        made.append(sandbox.sandbox_id)
        mounts = docker_client.api.inspect_container(sandbox.sandbox_id)["Mounts"]
        assert {m["Name"] for m in mounts if m["Type"] == "volume"} == set(wanted.volumes)
    finally:
        for sandbox_id in made:
            await backend.destroy(sandbox_id)
        await backend.close()
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag, force=True)
        for volume in wanted.names if wanted is not None else ():
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.volumes.get(volume).remove(force=True)
