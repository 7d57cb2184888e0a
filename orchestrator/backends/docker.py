"""Docker backend: one hardened container per session, driven through docker-py.

docker-py is synchronous, so every call goes through ``_call``, which runs it in a worker thread
under one capacity limiter: the event loop never blocks on the engine, and a burst of creates
cannot starve the threads the rest of the app uses. ``docker.errors`` never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib import resources
from typing import Any, ParamSpec, TypeVar

import anyio
import docker
import docker.errors
import requests
import structlog

from ..errors import BackendUnavailable, RunnerFailure, SandboxImageMissing, SandboxStartFailed, SandboxTaken
from ..index_gate import IndexGate
from ..models import Claim, SandboxInfo
from ..runner_client import RunnerClient
from ..settings import Settings
from . import labels, library
from .channel import SocketChannels
from .docker_spec import container_config

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Docker's multiplexed attach stream: 1 byte stream type, 3 zero bytes, 4-byte big-endian length.
_MUX_HEADER = struct.Struct(">BxxxI")
# How long a cold start waits for its failed first attempt's container to give up the session's name.
_NAME_FREE_SECONDS = 10.0
_STDOUT = 1
# A fill copies the image's Python trees (1.6 GB for the default image): a minute on a slow host.
_LIBRARY_FILL_SECONDS = 900.0
# How often creates look whether the image's tag has moved (a rebuild under a running service).
_LIBRARY_RECHECK_SECONDS = 10.0
# Without a set (no image at start, a failed fill): how often to try again.
_LIBRARY_RETRY_SECONDS = 60.0
# A claim's check of the engine's event log: how far past "now" it asks the second time, how long it
# waits for the answer, how often it re-reads the engine's clock, and the offset taken for noise.
_EVENTS_AHEAD_SECONDS = 0.05
_EVENTS_TIMEOUT_SECONDS = 2.0
_OFFSET_REFRESH_SECONDS = 60.0
_OFFSET_NOISE_SECONDS = 0.05
_GIVE_BACK_ATTEMPTS = 3


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
        socket_channel = settings.sandbox.channel == "socket"
        # Package installs need the socket directory: the gate listens beside the runner's socket.
        self._gate = IndexGate(settings.packages) if socket_channel and settings.packages.enabled else None
        self._sockets = (
            SocketChannels(
                settings.socket_dir, settings.instance, max_frame_bytes=settings.max_frame_bytes, gate=self._gate
            )
            if socket_channel
            else None
        )
        # Sandbox id -> its runner socket key, for sandboxes created or listed by this process.
        self._channel_keys: dict[str, str] = {}
        self._library: library.Library | None = None
        """Set once the image's library volumes are complete; sandboxes made before go without."""
        self._library_fill: asyncio.Task[None] | None = None
        self._library_checked = 0.0
        # The engine's clock against ours, for reading its event log (see _engine_offset).
        self._offset = 0.0
        self._offset_read_at = -_OFFSET_REFRESH_SECONDS

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
        if self._sockets is not None:
            self._sockets.check()
        if self._gate is not None:
            await self._gate.start()
        if self._client is None:
            pool = max(self._settings.docker_max_concurrent_calls, 10)
            self._client = await self._call(docker.from_env, max_pool_size=pool)
        if self._settings.sandbox.library_volumes:
            await self._start_library()

    async def _start_library(self, image: Any = None) -> None:
        """Use the image's library volumes at once if they are complete; otherwise fill them meanwhile.

        ``image``: the sandbox image as just looked up, if the caller has it.
        """
        try:
            if image is None:
                image = await self._call(self.client.images.get, self._settings.sandbox.image)
            wanted = library.plan(image.attrs)
            self._library_checked = time.monotonic()
            if wanted is None:
                return
            if await self._call(library.complete, self.client, wanted):
                self._library = wanted
                return
        except (SandboxImageMissing, BackendUnavailable):
            return  # the health check reports either; sandboxes go without library volumes meanwhile
        self._library_fill = asyncio.create_task(self._fill_library(wanted), name="library-fill")

    async def _current_library(self) -> library.Library | None:
        """The library for a new sandbox; its image is pinned to the volumes' image id.

        A rebuilt image moves the tag: its sandboxes must not mount the old image's trees, so they
        go without until the new image's set is filled.
        """
        if not self._settings.sandbox.library_volumes:
            return None
        current = self._library
        since = time.monotonic() - self._library_checked
        if current is None:
            # No set yet: the image was missing at start, or a fill failed. Try again now and then.
            if since >= _LIBRARY_RETRY_SECONDS and (self._library_fill is None or self._library_fill.done()):
                self._library_checked = time.monotonic()
                await self._start_library()
            return self._library
        if since < _LIBRARY_RECHECK_SECONDS:
            return current
        self._library_checked = time.monotonic()
        try:
            image = await self._call(self.client.images.get, self._settings.sandbox.image)
        except (SandboxImageMissing, BackendUnavailable):
            return current  # pinned by id, the old image still serves
        if image.id != current.image_id:
            log.info("library_image_changed", old=current.image_id[:19], new=image.id[:19])
            self._library = None
            if self._library_fill is None or self._library_fill.done():
                await self._start_library(image)
        return self._library

    async def _fill_library(self, wanted: library.Library) -> None:
        began = time.monotonic()
        log.info("library_fill_started", volumes=wanted.volumes, paths=wanted.paths)
        try:
            # Off the call limiter (a fill holds its thread for a minute); abandoned, not awaited, on close.
            await anyio.to_thread.run_sync(self._fill_and_sweep, wanted, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - sandboxes keep starting from the image alone
            log.warning("library_fill_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self._library = wanted
        log.info("library_ready", seconds=round(time.monotonic() - began, 1))

    def _fill_and_sweep(self, wanted: library.Library) -> None:
        library.fill(self.client, wanted, wait_seconds=_LIBRARY_FILL_SECONDS)
        if removed := library.sweep(self.client):
            log.info("library_volumes_removed", volumes=removed)

    async def library_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a fill under way; whether new sandboxes mount library volumes."""
        if self._library_fill is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._library_fill), timeout)
        return self._library is not None

    async def close(self) -> None:
        if self._library_fill is not None:
            self._library_fill.cancel()  # the engine finishes a copy it began; the next start sees it
        if self._sockets is not None:
            await self._sockets.close_all()
        if self._gate is not None:
            await self._gate.close()
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
        sandbox = await self.create_stopped(claim)
        await self.start_sandbox(sandbox.sandbox_id)
        log.info("sandbox_created", sandbox=sandbox.sandbox_id[:12], claimed=claim is not None)
        return dataclasses.replace(sandbox, running=True)

    async def create_stopped(self, claim: Claim | None) -> SandboxInfo:
        """The first half of ``create``: the container exists, with its channel, but is not started."""
        now = time.time()
        name = (
            labels.claimed_name(self._settings.instance, claim)
            if claim is not None
            else labels.pool_name(self._settings.instance)
        )
        current = await self._current_library()
        key = channel_dir = None
        if self._sockets is not None:
            key = secrets.token_hex(8)
            # Listening before the container starts lets the runner connect on its first try.
            channel_dir = await self._sockets.open(key)
        config = container_config(
            self._settings.sandbox,
            name=name,
            labels=labels.make_labels(
                self._settings.instance, self._profile, now, self._settings.test_run_label, channel=key
            ),
            seccomp_profile=self._seccomp,
            channel_dir=channel_dir,
            packages=self._settings.packages if self._gate is not None else None,
            library=current.mounts() if current is not None else None,
        )
        if current is not None:
            config["image"] = current.image_id
        creating = asyncio.ensure_future(self._call(self._create_container, config, claimed=claim is not None))
        try:
            container = await asyncio.shield(creating)
        except BaseException:
            # Cancelled (a shutdown mid-fill), we stop waiting but the engine call goes on in its
            # thread: what it makes would stay behind in state Created, owned by no one. The clean-up
            # is a task of its own, so a second cancel cannot cut it short either.
            await asyncio.shield(asyncio.ensure_future(self._discard(creating, key)))
            raise
        if key is not None:
            self._channel_keys[container.id] = key
        return SandboxInfo(
            sandbox_id=container.id, name=name, running=False, created_at=now, profile=self._profile, claim=claim
        )

    async def _discard(self, creating: asyncio.Future[Any], key: str | None) -> None:
        """Remove what a create that failed or was cancelled made, once its engine call has returned."""
        try:
            with contextlib.suppress(Exception):  # it failed: nothing was made
                await self.destroy((await creating).id)
        finally:
            if self._sockets is not None and key is not None:
                await self._sockets.close(key)

    def _create_container(self, config: dict[str, Any], *, claimed: bool) -> Any:
        """``containers.create``; a claimed name still held by an earlier attempt is freed first.

        A claimed name is its session's own, so the only other holder can be this control plane's
        failed first attempt at starting that session, whose removal may still be under way.
        """
        deadline = time.monotonic() + _NAME_FREE_SECONDS
        while True:
            try:
                return self.client.containers.create(**config)
            except docker.errors.APIError as exc:
                if not claimed or exc.status_code != 409 or time.monotonic() > deadline:
                    raise
            with contextlib.suppress(docker.errors.APIError):  # gone, or removal already in progress
                self.client.api.remove_container(config["name"], force=True, v=True)
            time.sleep(0.1)  # a worker thread, never the event loop

    async def start_sandbox(self, sandbox_id: str) -> None:
        """The second half of ``create``; a container that does not start is removed."""
        try:
            await self._call(self.client.api.start, sandbox_id)
        except BaseException as exc:
            await self.destroy(sandbox_id)
            if isinstance(exc, BackendUnavailable):
                raise SandboxStartFailed(f"sandbox container did not start: {exc}") from exc
            raise

    async def connect(self, sandbox: SandboxInfo, timeout: float) -> RunnerClient:
        key = self._channel_keys.get(sandbox.sandbox_id)
        if self._sockets is not None and key is not None:
            reader, writer = await self._sockets.accept(key, timeout)
            client = RunnerClient(
                reader,
                writer,
                max_frame_bytes=self._settings.max_frame_bytes,
                name=sandbox.name,
                hang_up_on_failure=True,
            )
        else:
            client = await self._attach(sandbox)
        try:
            await client.connect(timeout)
        except BaseException:
            await client.close()
            raise
        return client

    async def _attach(self, sandbox: SandboxInfo) -> RunnerClient:
        """A client on the container's attach stream (the attach channel, and sandboxes made with it)."""
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
        return client

    async def claim(self, sandbox: SandboxInfo, claim: Claim) -> SandboxInfo:
        name = labels.claimed_name(self._settings.instance, claim)
        taken = f"{sandbox.name}.taken"
        try:
            # The engine has no compare-and-swap, but a name is unique: of two control planes
            # renaming the same warm container to the same taken-name, only the first succeeds (the
            # other finds no container by the old name, or is told the name is already its own)...
            await self._call(self.client.api.rename, sandbox.name, taken)
        except BackendUnavailable as exc:
            if await self._renamed_elsewhere(sandbox):
                raise SandboxTaken(f"warm sandbox was claimed by another control plane: {exc}") from exc
            raise SandboxStartFailed(f"warm sandbox could not be claimed: {exc}") from exc
        # ...unless the other's rename looked the warm name up before ours and waited for the
        # container while ours ran: it then renames from whatever name the container has by then.
        try:
            winner = await self._call(self._earlier_claim, sandbox, taken)
        except BackendUnavailable as exc:
            # Unknown whether it is ours: removing it could end another's session; the reaper takes it
            # if nobody claims it, and its name keeps it out of any warm pool.
            raise SandboxTaken(f"warm sandbox claim could not be checked: {exc}") from exc
        if winner is not None:
            await self._give_back(sandbox.sandbox_id, winner)
            raise SandboxTaken(f"warm sandbox was claimed by another control plane as {winner}")
        try:
            await self._call(self.client.api.rename, sandbox.sandbox_id, name)
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

    def _earlier_claim(self, sandbox: SandboxInfo, taken: str) -> str | None:
        """The claimed name another control plane gave the container, if its claim came before ours.

        The engine resolves a rename's old name before it takes the container's lock, then renames
        from whatever name the container has by then. A claim that looked the warm name up while
        another claim held the lock can so land after that claim's second rename (taken -> claimed),
        and succeed. The engine logs renames in the order it made them, starting with the first
        claim's (warm -> taken); only that claim renames away from ``taken`` before asking this: such
        a rename after it means ours came second.

        Raises:
            BackendUnavailable: the log does not reach back to the first claim (the engine keeps its
                last 256 events, or its clock runs ahead of ours), or the engine did not answer.
        """
        # Until now on the engine's clock, then a little beyond it: the engine holds the answer back
        # until then, and the first claim's rename may be logged a moment "after" our now.
        for ahead in (0.0, _EVENTS_AHEAD_SECONDS):
            renames = self._renames(sandbox.sandbox_id, time.time() + self._engine_offset() + ahead)
            first = next(
                (i for i, r in enumerate(renames) if r["oldName"] == sandbox.name and r["name"] == taken), None
            )
            if first is not None:
                later = (r["name"] for r in renames[first + 1 :] if r["oldName"] == taken and r["name"])
                return next(later, None)
        raise BackendUnavailable("the engine's event log does not show the warm sandbox's first claim")

    def _renames(self, sandbox_id: str, until: float) -> list[dict[str, str]]:
        """The container's renames the engine still remembers up to ``until``, oldest first."""
        events = self.client.api.events(
            until=f"{until:.9f}", filters={"container": sandbox_id, "event": "rename"}, decode=True
        )
        # docker-py reads the events without a timeout: never wait on the engine for long.
        timer = threading.Timer(_EVENTS_TIMEOUT_SECONDS, events.close)
        timer.start()
        try:
            found = []
            for event in events:
                attributes = event.get("Actor", {}).get("Attributes", {})
                found.append(
                    {"oldName": str(attributes.get("oldName", "")).lstrip("/"), "name": str(attributes.get("name", ""))}
                )
            return found
        except Exception as exc:
            raise BackendUnavailable(f"reading the engine's events failed: {exc!r}") from exc
        finally:
            timer.cancel()
            events.close()

    def _engine_offset(self) -> float:
        """How far the engine's clock runs ahead of ours (0 within the error of measuring it), re-read
        every minute: a remote engine, or a virtual machine's after a sleep, can be off by minutes."""
        now = time.monotonic()
        if now - self._offset_read_at >= _OFFSET_REFRESH_SECONDS:
            before = time.time()
            system_time = str(self.client.api.info().get("SystemTime", ""))
            after = time.time()
            ours = (before + after) / 2
            try:
                # Nanoseconds are more than datetime takes; microseconds are plenty here.
                offset = datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", system_time)).timestamp() - ours
            except ValueError:
                offset = 0.0
            self._offset = offset if abs(offset) > max(after - before, _OFFSET_NOISE_SECONDS) else 0.0
            self._offset_read_at = now
        return self._offset

    async def _give_back(self, sandbox_id: str, winner: str) -> None:
        """Restore the winning claim's name, which our late rename took away."""
        for attempt in range(_GIVE_BACK_ATTEMPTS):
            try:
                await self._call(self.client.api.rename, sandbox_id, winner)
                return
            except BackendUnavailable as exc:
                log.warning("claim_give_back_failed", sandbox=sandbox_id[:12], attempt=attempt + 1, error=str(exc))

    async def _renamed_elsewhere(self, sandbox: SandboxInfo) -> bool:
        """Whether the container still exists under a name other than the one we saw (a lost claim)."""
        try:
            container = await self._call(self.client.containers.get, sandbox.sandbox_id)
        except BackendUnavailable:
            return False
        return bool(container.name != sandbox.name)

    async def list(self) -> list[SandboxInfo]:
        # sparse: one list call, no per-container inspect that races with removals (404 mid-listing).
        containers = await self._call(
            self.client.containers.list,
            all=True,
            sparse=True,
            filters={"label": labels.selector(self._settings.instance)},
        )
        found = []
        listed_keys = set()
        for container in containers:
            attrs = container.attrs
            container_labels = attrs.get("Labels") or {}
            name = (attrs.get("Names") or [""])[0].lstrip("/")
            if key := container_labels.get(labels.CHANNEL):
                self._channel_keys[container.id] = key
                listed_keys.add(key)
            found.append(
                SandboxInfo(
                    sandbox_id=container.id,
                    name=name,
                    running=attrs.get("State") == "running",
                    created_at=float(container_labels.get(labels.CREATED, "0") or 0),
                    profile=container_labels.get(labels.PROFILE, ""),
                    claim=(claim := labels.parse_claim(name)),
                    pristine=claim is not None or labels.is_pool_name(name),
                )
            )
        if self._sockets is not None:
            # Directories of sandboxes removed behind our back; ones being created still listen.
            self._sockets.sweep(listed_keys, grace=self._settings.orphan_grace_seconds)
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
        key = self._channel_keys.pop(sandbox_id, None)
        if self._sockets is not None and key is not None:
            await self._sockets.close(key)
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
