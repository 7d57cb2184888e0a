"""Docker backend: one hardened container per session, driven through docker-py.

docker-py is synchronous, so every call goes through ``_call``, which runs it in a worker thread
under one capacity limiter: the event loop never blocks on the engine, and a burst of creates
cannot starve the threads the rest of the app uses. ``docker.errors`` never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from importlib import resources
from typing import ParamSpec, TypeVar

import anyio
import docker
import docker.errors
import requests
import structlog

from ..errors import BackendUnavailable, RunnerFailure, SandboxImageMissing, SandboxStartFailed
from ..models import Claim, SandboxInfo
from ..runner_client import RunnerClient
from ..settings import Settings
from . import labels
from .docker_spec import container_config

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Docker's multiplexed attach stream: 1 byte stream type, 3 zero bytes, 4-byte big-endian length.
_MUX_HEADER = struct.Struct(">BxxxI")
_STDOUT = 1


@contextlib.contextmanager
def _docker_errors() -> Iterator[None]:
    """Translate docker-py's exceptions into ours (most specific first)."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise SandboxImageMissing(
            f"sandbox image missing: {exc.explanation or exc}; build it with `make image`"
        ) from exc
    except (docker.errors.APIError, docker.errors.DockerException, requests.RequestException) as exc:
        raise BackendUnavailable(f"docker engine error: {exc}") from exc


def load_seccomp_profile(settings: Settings) -> str:
    """The seccomp profile's JSON text: the configured file, or the one shipped in this package."""
    if settings.sandbox.seccomp_profile is not None:
        return settings.sandbox.seccomp_profile.read_text()
    return resources.files("orchestrator.backends").joinpath("seccomp.json").read_text()


class DockerBackend:
    """``Backend`` on a Docker Engine reached through ``DOCKER_HOST`` or the default socket."""

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self._settings = settings
        self._client = client
        self._limiter = anyio.CapacityLimiter(settings.docker_max_concurrent_calls)
        self._seccomp = load_seccomp_profile(settings)
        self._profile = settings.sandbox.profile_key()

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        def run() -> T:
            with _docker_errors():
                return fn(*args, **kwargs)

        return await anyio.to_thread.run_sync(run, limiter=self._limiter)

    @property
    def client(self) -> docker.DockerClient:
        """The docker-py client (opened by ``start``)."""
        if self._client is None:
            raise BackendUnavailable("docker backend is not started")
        return self._client

    async def start(self) -> None:
        if self._client is None:
            pool = max(self._settings.docker_max_concurrent_calls, 10)
            self._client = await self._call(docker.from_env, max_pool_size=pool)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()

    async def ping(self) -> None:
        await self._call(self.client.ping)

    async def image_present(self) -> bool:
        try:
            await self._call(self.client.images.get, self._settings.sandbox.image)
        except SandboxImageMissing:
            return False
        return True

    async def create(self, claim: Claim | None) -> SandboxInfo:
        now = time.time()
        name = (
            labels.claimed_name(self._settings.instance, claim)
            if claim is not None
            else labels.pool_name(self._settings.instance)
        )
        config = container_config(
            self._settings.sandbox,
            name=name,
            labels=labels.make_labels(self._settings.instance, self._profile, now, self._settings.test_run_label),
            seccomp_profile=self._seccomp,
        )
        container = await self._call(self.client.containers.create, **config)
        try:
            await self._call(container.start)
        except BaseException as exc:
            await self.destroy(container.id)
            if isinstance(exc, BackendUnavailable):
                raise SandboxStartFailed(f"sandbox container did not start: {exc}") from exc
            raise
        log.info("sandbox_created", sandbox=container.id[:12], claimed=claim is not None)
        return SandboxInfo(
            sandbox_id=container.id, name=name, running=True, created_at=now, profile=self._profile, claim=claim
        )

    async def connect(self, sandbox: SandboxInfo, timeout: float) -> RunnerClient:
        params = {"stdin": 1, "stdout": 1, "stderr": 0, "stream": 1}
        try:
            raw = await self._call(self.client.api.attach_socket, sandbox.sandbox_id, params=params)
        except BackendUnavailable as exc:
            raise RunnerFailure(f"cannot attach to sandbox {sandbox.sandbox_id[:12]}: {exc}") from exc
        # Our own descriptor for the upgraded connection: asyncio owns it, docker-py's wrappers are done.
        inner: socket.socket = getattr(raw, "_sock", raw)
        sock = inner.dup()
        inner.close()
        raw.close()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        limit = self._settings.max_frame_bytes + 1024
        mux_reader = asyncio.StreamReader(limit=limit)
        transport, protocol = await loop.create_connection(lambda: asyncio.StreamReaderProtocol(mux_reader), sock=sock)
        writer = asyncio.StreamWriter(transport, protocol, mux_reader, loop)
        stdout = asyncio.StreamReader(limit=limit)
        pump = asyncio.create_task(_demux(mux_reader, stdout), name=f"demux-{sandbox.sandbox_id[:12]}")
        client = RunnerClient(stdout, writer, max_frame_bytes=self._settings.max_frame_bytes, name=sandbox.name)
        client.on_close(pump.cancel)
        try:
            await client.connect(timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def claim(self, sandbox: SandboxInfo, claim: Claim) -> SandboxInfo:
        name = labels.claimed_name(self._settings.instance, claim)
        try:
            container = await self._call(self.client.containers.get, sandbox.sandbox_id)
            await self._call(container.rename, name)
        except BackendUnavailable as exc:
            raise SandboxStartFailed(f"warm sandbox could not be claimed: {exc}") from exc
        return SandboxInfo(
            sandbox_id=sandbox.sandbox_id,
            name=name,
            running=sandbox.running,
            created_at=sandbox.created_at,
            profile=sandbox.profile,
            claim=claim,
        )

    async def list(self) -> list[SandboxInfo]:
        # sparse: one list call, no per-container inspect that races with removals (404 mid-listing).
        containers = await self._call(
            self.client.containers.list,
            all=True,
            sparse=True,
            filters={"label": labels.selector(self._settings.instance)},
        )
        found = []
        for container in containers:
            attrs = container.attrs
            container_labels = attrs.get("Labels") or {}
            name = (attrs.get("Names") or [""])[0].lstrip("/")
            found.append(
                SandboxInfo(
                    sandbox_id=container.id,
                    name=name,
                    running=attrs.get("State") == "running",
                    created_at=float(container_labels.get(labels.CREATED, "0") or 0),
                    profile=container_labels.get(labels.PROFILE, ""),
                    claim=labels.parse_claim(name),
                )
            )
        return found

    async def destroy(self, sandbox_id: str) -> None:
        def remove() -> None:
            try:
                self.client.api.remove_container(sandbox_id, force=True, v=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                # 409 "removal already in progress" means someone else is doing our job.
                if exc.status_code == 409:
                    return
                raise

        await self._call(remove)
        log.info("sandbox_removed", sandbox=sandbox_id[:12])


async def _demux(source: asyncio.StreamReader, stdout: asyncio.StreamReader) -> None:
    """Unwrap Docker's multiplexed attach stream into the runner's stdout bytes."""
    try:
        while True:
            header = await source.readexactly(_MUX_HEADER.size)
            kind, length = _MUX_HEADER.unpack(header)
            payload = await source.readexactly(length)
            if kind == _STDOUT:
                stdout.feed_data(payload)
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        pass
    finally:
        stdout.feed_eof()
