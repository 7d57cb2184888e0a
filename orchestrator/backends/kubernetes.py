"""Kubernetes backend: one hardened pod per sandbox, driven through kubernetes_asyncio.

The API server is the source of truth: a pod's labels say that we manage it, for which instance and
profile, and whether it is warm or claimed; its claim annotation holds the session. A claim is
one PATCH carrying the resourceVersion the claimer last saw, so of two control planes racing for
one warm pod exactly one wins (the other gets 409 Conflict and falls back to a cold start). The
runner channel is the pod's attach stream (stdin/stdout) through the API server, spoken with the
``v5.channel.k8s.io`` websocket subprotocol: no pod network is needed, so sandbox pods keep a
deny-all NetworkPolicy. ``kubernetes_asyncio`` exceptions never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final

import aiohttp
import structlog
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.leaderelection.electionconfig import Config as ElectionConfig
from kubernetes_asyncio.leaderelection.leaderelection import LeaderElection
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock
from kubernetes_asyncio.stream import WsApiClient

from ..errors import BackendUnavailable, RunnerFailure, SandboxImageMissing, SandboxStartFailed, SandboxTaken
from ..models import Claim, SandboxInfo
from ..runner_client import RunnerClient
from ..settings import Settings
from . import kubernetes_spec as spec

log = structlog.get_logger(__name__)

# Channel bytes of the Kubernetes streaming protocol (v4 and v5); v5 adds CLOSE.
_STDIN: Final = 0
_STDOUT: Final = 1
_ERROR: Final = 3
SUBPROTOCOL: Final = "v5.channel.k8s.io"
# The API server relays stdin in messages; big frames (uploaded files) go in pieces.
_STDIN_CHUNK: Final = 256 * 1024
_PAGE: Final = 500
_CLAIM_ATTEMPTS: Final = 3


@contextlib.contextmanager
def _api_errors(what: str) -> Iterator[None]:
    """Translate the client's exceptions into ours."""
    try:
        yield
    except ApiException as exc:
        raise BackendUnavailable(f"kubernetes API error {exc.status} while {what}: {exc.reason}") from exc
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise BackendUnavailable(f"kubernetes API unreachable while {what}: {exc}") from exc


@contextlib.asynccontextmanager
async def _watch() -> AsyncIterator[watch.Watch]:
    """A ``Watch`` whose response is released however the block ends.

    ``Watch.close()`` awaits the close of a client of its own before it releases the response, so a
    cancellation arriving there (a shutdown while a pool fill's pod had just started) skips the
    release, and the connection is never returned: it warns when collected. The release is synchronous.
    """
    pods = watch.Watch()
    try:
        yield pods
    finally:
        if pods.resp is not None:
            pods.resp.release()
            pods.resp = None
        await pods.close()


async def _json(call: Awaitable[Any]) -> dict[str, Any]:
    """The body of a call made with ``_preload_content=False``: plain dicts, no model round trip."""
    response = await call
    async with response:
        body = await response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=body.decode(errors="replace")[:500])
    decoded: dict[str, Any] = json.loads(body)
    return decoded


class KubernetesBackend:
    """``Backend`` on a Kubernetes cluster: pods in ``settings.kubernetes.namespace``."""

    def __init__(self, settings: Settings, *, on_lost_leadership: Callable[[], None] | None = None) -> None:
        self._settings = settings
        self._on_lost_leadership = on_lost_leadership or _terminate
        self._election: asyncio.Task[None] | None = None
        self._kube = settings.kubernetes
        self._namespace = settings.kubernetes.namespace
        self._profile = settings.sandbox.profile_key()
        self._api: client.ApiClient | None = None
        self._ws: WsApiClient | None = None
        # Pod name -> the resourceVersion last seen, so a claim usually needs no GET first.
        self._versions: dict[str, str] = {}
        # Attach streams' readers, and the closes of sockets whose reader never ran: close() cancels the
        # readers and waits for the closes, so no websocket outlives the client.
        self._pumps: set[asyncio.Future[Any]] = set()
        self._closers: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        configuration = client.Configuration()
        if self._kube.kubeconfig is not None:
            await config.load_kube_config(config_file=str(self._kube.kubeconfig), client_configuration=configuration)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = self._kube.max_concurrent_calls
        self._api = client.ApiClient(configuration)
        self._ws = WsApiClient(configuration)
        if self._kube.leader_election:
            await self._lead(self._api)

    async def _lead(self, api: client.ApiClient) -> None:
        """Return once this replica holds the Lease; keep renewing it in the background.

        Only the holder reconciles, fills the pool, reaps and serves (a standby's lifespan waits
        here, so it is not ready). Losing the Lease ends the process, as client-go's callers do:
        a replica that cannot prove it leads must not go on removing or handing out sandboxes.
        """
        identity = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        leading = asyncio.Event()

        async def started() -> None:
            log.info("leader_elected", identity=identity, lease=self._kube.lease_name)
            leading.set()

        async def stopped() -> None:
            log.critical("leadership_lost", identity=identity, lease=self._kube.lease_name)
            self._on_lost_leadership()

        election = LeaderElection(
            ElectionConfig(
                LeaseLock(self._kube.lease_name, self._namespace, identity, api),
                lease_duration=self._kube.lease_duration_seconds,
                renew_deadline=self._kube.renew_deadline_seconds,
                retry_period=self._kube.retry_period_seconds,
                onstarted_leading=started,
                onstopped_leading=stopped,
            )
        )
        self._election = asyncio.create_task(election.run(), name="leader-election")
        log.info("awaiting_leadership", identity=identity, lease=self._kube.lease_name)
        waiting = asyncio.create_task(leading.wait())
        await asyncio.wait({self._election, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not leading.is_set():
            waiting.cancel()
            failure = self._election.exception()
            raise BackendUnavailable(f"leader election ended before this replica led: {failure!r}")

    async def close(self) -> None:
        while self._pumps or self._closers:
            for pump in list(self._pumps):
                pump.cancel()
            # Never cancelled: a close cancelled before it ran leaves the connection checked out of the pool.
            await asyncio.gather(*self._pumps, *self._closers, return_exceptions=True)
        if self._election is not None:
            self._election.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._election
            self._election = None
        for api in (self._api, self._ws):
            if api is not None:
                await api.close()
        self._api = self._ws = None

    @property
    def _core(self) -> Any:
        # Any: the generated signatures omit keywords the client accepts (``_preload_content``,
        # ``_content_type``, ``_headers``) and want models where we send plain dicts.
        if self._api is None:
            raise BackendUnavailable("kubernetes backend is not started")
        return client.CoreV1Api(self._api)

    async def ping(self) -> None:
        if self._api is None:
            raise BackendUnavailable("kubernetes backend is not started")
        with _api_errors("checking the API server"):
            await client.VersionApi(self._api).get_code()

    async def image_present(self) -> bool:
        # Only a node knows; a missing image shows up at create as SandboxImageMissing.
        return True

    async def create(self, claim: Claim | None) -> SandboxInfo:
        now = time.time()
        name = f"tci-{secrets.token_hex(8)}"
        manifest = spec.pod_manifest(
            self._settings.sandbox,
            self._kube,
            name=name,
            instance=self._settings.instance,
            profile=self._profile,
            created_at=now,
            claim=claim,
            test_run=self._settings.test_run_label,
        )
        request = self._core.create_namespaced_pod(self._namespace, manifest, _preload_content=False)
        creating = asyncio.ensure_future(_json(request))
        try:
            with _api_errors("creating a sandbox pod"):
                # Shielded: a create cancelled while its request is out may still make the pod, and a
                # delete sent before the API server has seen the create would miss it.
                created = await asyncio.shield(creating)
            await self._until_running(name, created["metadata"]["resourceVersion"])
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(self._discard(creating, name)))
            raise
        log.info("sandbox_created", sandbox=name, claimed=claim is not None)
        return SandboxInfo(sandbox_id=name, name=name, running=True, created_at=now, profile=self._profile, claim=claim)

    async def _discard(self, creating: asyncio.Future[dict[str, Any]], name: str) -> None:
        """Delete the pod a create that failed or was cancelled may have made, once its request is answered."""
        await asyncio.wait({creating})
        if creating.cancelled() or not isinstance(creating.exception(), ApiException):
            # Made, or no answer to say it was not (a broken connection, a timeout).
            with contextlib.suppress(BackendUnavailable):
                await self.destroy(name)

    async def _until_running(self, name: str, version: str) -> None:
        """Watch one pod from ``version`` until its container runs; fail on an end or a missing image."""
        timeout = self._settings.runner_ready_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                while True:
                    with _api_errors("watching a new sandbox pod"):
                        async with _watch() as pods:
                            stream = pods.stream(
                                self._core.list_namespaced_pod,
                                self._namespace,
                                field_selector=f"metadata.name={name}",
                                resource_version=version,
                                timeout_seconds=int(timeout) + 1,
                            )
                            async for event in stream:
                                pod = event["raw_object"]
                                version = pod["metadata"]["resourceVersion"]
                                self._versions[name] = version
                                if event["type"] == "DELETED":
                                    raise SandboxStartFailed(f"sandbox pod {name} was deleted while starting")
                                if self._started(name, pod):
                                    return
                    # The server ended the watch (its timeout): look once, then watch on from there.
                    with _api_errors("reading a new sandbox pod"):
                        pod = await _json(self._core.read_namespaced_pod(name, self._namespace, _preload_content=False))
                    version = pod["metadata"]["resourceVersion"]
                    if self._started(name, pod):
                        return
        except TimeoutError as exc:
            raise SandboxStartFailed(f"sandbox pod {name} was not running after {timeout:g} s") from exc
        except BackendUnavailable as exc:
            raise SandboxStartFailed(f"sandbox pod {name} did not start: {exc}") from exc

    def _started(self, name: str, pod: dict[str, Any]) -> bool:
        state = spec.pod_state(pod)
        if state.image_missing:
            raise SandboxImageMissing(
                f"sandbox image {self._settings.sandbox.image} cannot be pulled on the node ({state.reason})"
            )
        if state.finished:
            raise SandboxStartFailed(f"sandbox pod {name} ended while starting ({state.reason})")
        return state.running

    async def connect(self, sandbox: SandboxInfo, timeout: float) -> RunnerClient:
        if self._ws is None:
            raise BackendUnavailable("kubernetes backend is not started")
        try:
            async with asyncio.timeout(timeout):
                attach: Any = client.CoreV1Api(self._ws).connect_get_namespaced_pod_attach
                request = await attach(
                    sandbox.sandbox_id,
                    self._namespace,
                    container=spec.CONTAINER,
                    stdin=True,
                    stdout=True,
                    stderr=False,
                    tty=False,
                    _preload_content=False,
                    _headers={"sec-websocket-protocol": SUBPROTOCOL},
                )
                socket: aiohttp.ClientWebSocketResponse = await request
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RunnerFailure(f"cannot attach to sandbox pod {sandbox.sandbox_id}: {exc}") from exc
        limit = self._settings.max_frame_bytes + 1024
        stdout = asyncio.StreamReader(limit=limit)
        pump = asyncio.create_task(_demux(socket, stdout), name=f"attach-{sandbox.sandbox_id}")
        self._track(pump, socket)
        runner = RunnerClient(
            stdout, _AttachSink(socket, pump), max_frame_bytes=self._settings.max_frame_bytes, name=sandbox.name
        )
        runner.on_close(pump.cancel)
        try:
            await runner.connect(timeout)
        except BaseException:
            await runner.close()
            raise
        return runner

    def _track(self, pump: asyncio.Task[None], socket: aiohttp.ClientWebSocketResponse) -> None:
        """Keep ``pump`` until it ends; a pump cancelled before it ran never closed its socket."""
        self._pumps.add(pump)

        def done(task: asyncio.Future[Any]) -> None:
            self._pumps.discard(task)
            if not socket.closed:
                closer = asyncio.ensure_future(socket.close())
                self._closers.add(closer)
                closer.add_done_callback(self._closers.discard)

        pump.add_done_callback(done)

    async def claim(self, sandbox: SandboxInfo, claim: Claim) -> SandboxInfo:
        name = sandbox.sandbox_id
        for _ in range(_CLAIM_ATTEMPTS):
            version = self._versions.pop(name, None) or await self._warm_version(name)
            body = {"metadata": {"resourceVersion": version, **spec.claim_metadata(claim)}}
            try:
                patched = await _json(
                    self._core.patch_namespaced_pod(
                        name,
                        self._namespace,
                        body,
                        _content_type="application/merge-patch+json",
                        _preload_content=False,
                    )
                )
            except ApiException as exc:
                if exc.status == 409:
                    # Changed since we looked: re-read; only a pod still warm is worth another try.
                    continue
                raise SandboxStartFailed(f"warm sandbox {name} could not be claimed: {exc.status}") from exc
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise SandboxStartFailed(f"warm sandbox {name} could not be claimed: {exc}") from exc
            self._versions[name] = patched["metadata"]["resourceVersion"]
            return SandboxInfo(
                sandbox_id=name,
                name=name,
                running=sandbox.running,
                created_at=sandbox.created_at,
                profile=sandbox.profile,
                claim=claim,
            )
        raise SandboxStartFailed(f"warm sandbox {name} kept changing while being claimed")

    async def _warm_version(self, name: str) -> str:
        """The resourceVersion of a pod that is still warm and alive, or SandboxStartFailed."""
        try:
            pod = await _json(self._core.read_namespaced_pod(name, self._namespace, _preload_content=False))
        except (ApiException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise SandboxStartFailed(f"warm sandbox {name} is gone: {exc}") from exc
        metadata = pod["metadata"]
        if (metadata.get("labels") or {}).get(spec.STATE) != spec.WARM:
            raise SandboxTaken(f"warm sandbox {name} was claimed by another control plane")
        if not spec.pod_state(pod).running:
            raise SandboxStartFailed(f"warm sandbox {name} is not running")
        return str(metadata["resourceVersion"])

    async def list(self) -> list[SandboxInfo]:
        found: list[SandboxInfo] = []
        token: str | None = None
        seen: dict[str, str] = {}
        while True:
            with _api_errors("listing sandbox pods"):
                page = await _json(
                    self._core.list_namespaced_pod(
                        self._namespace,
                        label_selector=spec.selector(self._settings.instance),
                        limit=_PAGE,
                        _continue=token,
                        _preload_content=False,
                    )
                )
            for pod in page.get("items") or []:
                metadata = pod["metadata"]
                if metadata.get("deletionTimestamp"):
                    continue  # being removed already: gone, as far as sessions are concerned
                name = metadata["name"]
                seen[name] = metadata["resourceVersion"]
                found.append(
                    SandboxInfo(
                        sandbox_id=name,
                        name=name,
                        running=spec.pod_state(pod).running,
                        created_at=spec.created_at(metadata),
                        profile=(metadata.get("labels") or {}).get(spec.PROFILE, ""),
                        claim=spec.parse_claim(metadata),
                    )
                )
            token = (page.get("metadata") or {}).get("continue") or None
            if token is None:
                break
        self._versions = seen
        return found

    async def destroy(self, sandbox_id: str) -> None:
        try:
            await _json(self._core.delete_namespaced_pod(sandbox_id, self._namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise BackendUnavailable(f"kubernetes API error {exc.status} deleting a pod: {exc.reason}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"kubernetes API unreachable deleting a pod: {exc}") from exc
        self._versions.pop(sandbox_id, None)
        log.info("sandbox_removed", sandbox=sandbox_id)


def _terminate() -> None:
    """Stop this process the way Kubernetes would: SIGTERM, so uvicorn shuts down in order."""
    os.kill(os.getpid(), signal.SIGTERM)


class _AttachSink:
    """The runner client's writer: frames go out as stdin messages of the attach websocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, pump: asyncio.Task[None]) -> None:
        self._socket = socket
        self._pump = pump
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data

    async def drain(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        try:
            for start in range(0, len(data), _STDIN_CHUNK):
                await self._socket.send_bytes(bytes([_STDIN]) + data[start : start + _STDIN_CHUNK])
        except (aiohttp.ClientError, RuntimeError) as exc:
            raise ConnectionResetError(f"attach stream closed: {exc}") from exc

    def close(self) -> None:
        # The pump owns the socket and closes it on its way out.
        self._pump.cancel()


async def _demux(socket: aiohttp.ClientWebSocketResponse, stdout: asyncio.StreamReader) -> None:
    """Unwrap the attach websocket's channel bytes into the runner's stdout bytes."""
    try:
        async for message in socket:
            if message.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                break
            data = message.data if isinstance(message.data, bytes) else str(message.data).encode()
            if not data:
                continue
            if data[0] == _STDOUT:
                stdout.feed_data(data[1:])
            elif data[0] == _ERROR:
                break  # the container ended: the status follows on the error channel
    finally:
        stdout.feed_eof()
        with contextlib.suppress(Exception):
            await socket.close()
