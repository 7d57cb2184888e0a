"""The backend contract: what every ``Backend`` must do, run against each one.

Docker runs on the real engine with the real sandbox image. Kubernetes runs against the emulated
API server and kubelet of ``kube_emulator`` (real HTTP, watch and attach websocket through
kubernetes_asyncio; runners as local processes with real kernels). Two backend objects on one
platform stand for two control-plane replicas, or for one replica before and after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from fastapi.testclient import TestClient
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.watch import Watch

from orchestrator.app import create_app, make_backend
from orchestrator.backends import kubernetes_spec as spec
from orchestrator.backends.base import Backend
from orchestrator.backends.docker import DockerBackend
from orchestrator.backends.kubernetes import KubernetesBackend
from orchestrator.errors import SandboxImageMissing, SandboxStartFailed, SandboxTaken, SessionNotFound
from orchestrator.metrics import Metrics
from orchestrator.models import Claim, SandboxInfo
from orchestrator.sessions import SessionManager
from orchestrator.settings import KubernetesSettings, SandboxSettings, Settings

from .kube_emulator import MISSING_IMAGE_PREFIX, Cluster

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """An object a test leaked (an unreleased HTTP connection, say) warns when it is collected, which
    fails the test then running: collecting after each test names the one that leaked it."""
    yield
    gc.collect()


@dataclass
class Platform:
    """One place sandboxes run, seen by as many control planes as a test makes."""

    make_settings: Callable[..., Settings]
    vanish: Callable[[str], None]
    kill: Callable[[str], None]

    def backend(self, **overrides: Any) -> Backend:
        return make_backend(self.make_settings(**overrides))


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    cluster.start()
    yield cluster
    cluster.stop()


def _kubernetes(cluster: Cluster, tmp_path: Path) -> Platform:
    namespace = f"ns-{secrets.token_hex(4)}"
    instance = f"k8s{secrets.token_hex(4)}"
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", namespace)

    def make_settings(**overrides: Any) -> Settings:
        sandbox = SandboxSettings(**overrides.pop("sandbox", {}))
        defaults: dict[str, Any] = {"pool_size": 0, "reaper_interval_seconds": 3600, "log_format": "console"}
        return Settings(
            backend="kubernetes",
            instance=overrides.pop("instance", instance),
            sandbox=sandbox,
            kubernetes=KubernetesSettings(namespace=namespace, kubeconfig=kubeconfig),
            **{**defaults, **overrides},
        )

    return Platform(
        make_settings,
        vanish=lambda name: cluster.vanish_sync(namespace, name),
        kill=lambda name: cluster.kill_runner_sync(namespace, name),
    )


def _docker(request: pytest.FixtureRequest) -> Platform:
    client: docker.DockerClient = request.getfixturevalue("docker_client")
    make_settings: Callable[..., Settings] = request.getfixturevalue("make_settings")

    def vanish(sandbox_id: str) -> None:
        client.api.remove_container(sandbox_id, force=True)

    def kill(sandbox_id: str) -> None:
        client.api.kill(sandbox_id)

    def settings(**overrides: Any) -> Settings:
        # The fixture fixes instance and image; the test-run label stays, so cleanup still finds all.
        update: dict[str, Any] = {"instance": overrides.pop("instance")} if "instance" in overrides else {}
        made = make_settings(**{k: v for k, v in overrides.items() if k != "sandbox"})
        update["sandbox"] = made.sandbox.model_copy(update=overrides.get("sandbox", {}))
        return made.model_copy(update=update)

    return Platform(settings, vanish=vanish, kill=kill)


@pytest.fixture(params=[pytest.param("docker", marks=pytest.mark.docker), "kubernetes"])
def platform(request: pytest.FixtureRequest, tmp_path: Path) -> Platform:
    if request.param == "kubernetes":
        return _kubernetes(request.getfixturevalue("kube_cluster"), tmp_path)
    return _docker(request)


@pytest.fixture
async def backend(platform: Platform) -> AsyncIterator[Backend]:
    started = platform.backend()
    await started.start()
    yield started
    for sandbox in await started.list():
        await started.destroy(sandbox.sandbox_id)
    await started.close()


def _claim(tenant: str = "team-a") -> Claim:
    now = round(time.time(), 3)
    return Claim(f"ses_{secrets.token_hex(8)}", tenant, now, now + 600)


async def _eventually(predicate: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def test_create_connect_and_execute_through_the_runner(backend: Backend) -> None:
    sandbox = await backend.create(None)
    assert sandbox.running
    assert sandbox.claim is None
    client = await backend.connect(sandbox, timeout=30)
    try:
        await client.request("ready", {"timeout": 30}, timeout=35)
        result = await client.request("execute", {"code": "print(6 * 7)", "timeout": 10}, timeout=30)
    finally:
        await client.close()
    assert result["outcome"] == "ok"
    assert result["outputs"] == [{"type": "stdout", "data": "42\n"}]


async def test_a_second_connect_takes_over_the_channel(backend: Backend) -> None:
    sandbox = await backend.create(None)
    first = await backend.connect(sandbox, timeout=30)
    await first.request("ready", {"timeout": 30}, timeout=35)
    await first.request("execute", {"code": "kept = 'state'", "timeout": 10}, timeout=30)
    await first.close()
    second = await backend.connect(sandbox, timeout=30)
    try:
        result = await second.request("execute", {"code": "print(kept)", "timeout": 10}, timeout=30)
    finally:
        await second.close()
    assert result["outputs"] == [{"type": "stdout", "data": "state\n"}]


async def test_claim_at_creation_is_recorded_on_the_platform(backend: Backend) -> None:
    claim = _claim()
    sandbox = await backend.create(claim)
    listed = {s.sandbox_id: s for s in await backend.list()}
    assert listed[sandbox.sandbox_id].claim == claim
    assert listed[sandbox.sandbox_id].running


async def test_claim_race_between_two_control_planes_has_one_winner(platform: Platform, backend: Backend) -> None:
    other = platform.backend()
    await other.start()
    try:
        warm = await backend.create(None)
        (seen_by_other,) = [s for s in await other.list() if s.sandbox_id == warm.sandbox_id]
        claims = [_claim("team-a"), _claim("team-b")]
        results = await asyncio.gather(
            backend.claim(warm, claims[0]), other.claim(seen_by_other, claims[1]), return_exceptions=True
        )
    finally:
        await other.close()
    winners = [r for r in results if isinstance(r, SandboxInfo)]
    losers = [r for r in results if isinstance(r, SandboxTaken)]
    assert len(winners) == 1, results
    assert len(losers) == 1, results  # "taken", not "broken": the loser must leave it running
    (listed,) = [s for s in await backend.list() if s.sandbox_id == warm.sandbox_id]
    assert listed.claim == winners[0].claim
    assert listed.running


async def test_claiming_a_vanished_warm_sandbox_fails_cleanly(platform: Platform, backend: Backend) -> None:
    warm = await backend.create(None)
    await backend.list()
    platform.vanish(warm.sandbox_id)
    with pytest.raises(SandboxStartFailed):
        await backend.claim(warm, _claim())


async def test_list_sees_this_instance_only(platform: Platform, backend: Backend) -> None:
    neighbour = platform.backend(instance=f"other{secrets.token_hex(3)}")
    await neighbour.start()
    try:
        theirs = await neighbour.create(None)
        ours = await backend.create(None)
        assert {s.sandbox_id for s in await backend.list()} == {ours.sandbox_id}
        assert theirs.sandbox_id in {s.sandbox_id for s in await neighbour.list()}
    finally:
        await neighbour.destroy(theirs.sandbox_id)
        await neighbour.close()


async def test_destroy_is_idempotent(backend: Backend) -> None:
    sandbox = await backend.create(None)
    await backend.destroy(sandbox.sandbox_id)
    await backend.destroy(sandbox.sandbox_id)
    assert sandbox.sandbox_id not in {s.sandbox_id for s in await backend.list()}


async def test_a_dead_sandbox_is_listed_as_not_running(platform: Platform, backend: Backend) -> None:
    sandbox = await backend.create(None)
    platform.kill(sandbox.sandbox_id)

    async def stopped() -> bool:
        return any(s.sandbox_id == sandbox.sandbox_id and not s.running for s in await backend.list())

    await _eventually(stopped, "the killed sandbox to be listed as not running")


async def test_a_missing_image_is_reported_and_leaves_nothing(platform: Platform) -> None:
    backend = platform.backend(sandbox={"image": f"{MISSING_IMAGE_PREFIX}tci-sandbox:absent"})
    await backend.start()
    try:
        with pytest.raises(SandboxImageMissing):
            await backend.create(None)
        assert await backend.list() == []
    finally:
        await backend.close()


@contextlib.asynccontextmanager
async def _control_plane(
    platform: Platform, *, keep: bool = False, **overrides: Any
) -> AsyncIterator[tuple[Backend, SessionManager]]:
    """A started backend and session manager, as the app's lifespan makes them; shut down after,
    removing every sandbox unless ``keep`` (for the next control plane to adopt)."""
    backend = platform.backend(**overrides)
    await backend.start()
    manager = SessionManager(platform.make_settings(**overrides), backend, Metrics())
    try:
        await manager.start()
        yield backend, manager
    finally:
        await manager.shutdown()
        for sandbox in [] if keep else await backend.list():
            await backend.destroy(sandbox.sandbox_id)
        await backend.close()


async def test_sessions_are_reconciled_after_a_restart(platform: Platform) -> None:
    async with _control_plane(platform, keep=True) as (_, manager):
        result = await manager.execute("team-a", None, "x = 41 + 1", None, timeout=20)
    async with _control_plane(platform) as (_, again):
        views = again.sessions_of("team-a")
        assert [v.session_id for v in views] == [result.session_id]
        assert views[0].execute_count == 1
        answer = await again.execute("team-a", result.session_id, "print(x)", None, timeout=20)
        assert answer.outputs == [{"type": "stdout", "data": "42\n"}]
        assert again.sessions_of("team-b") == []


async def test_a_vanished_sandbox_ends_its_session(platform: Platform) -> None:
    async with _control_plane(platform) as (backend, manager):
        result = await manager.execute("team-a", None, "y = 1", None, timeout=20)
        (sandbox,) = await backend.list()
        platform.vanish(sandbox.sandbox_id)
        report = await manager.reap()
        assert report.removed["vanished"] == 1
        with pytest.raises(SessionNotFound):
            await manager.execute("team-a", result.session_id, "print(y)", None, timeout=20)
        assert await backend.list() == []


async def test_warm_pool_hand_out_through_the_session_layer(platform: Platform) -> None:
    async with _control_plane(platform, pool_size=1) as (backend, manager):

        async def warm() -> bool:
            return manager.pool.ready_count == 1

        await _eventually(warm, "one warm sandbox", timeout=60)
        (pooled,) = await backend.list()
        assert pooled.claim is None
        result = await manager.execute("team-a", None, "print('from the pool')", None, timeout=20)
        assert result.outputs == [{"type": "stdout", "data": "from the pool\n"}]
        listed = {s.sandbox_id: s for s in await backend.list()}
        claim = listed[pooled.sandbox_id].claim
        assert claim is not None
        assert claim.session_id == result.session_id


def test_the_tci_api_runs_on_the_backend(platform: Platform) -> None:
    headers = {"Authorization": "Bearer sk-contract"}
    with TestClient(create_app(platform.make_settings(execute_timeout_seconds=20))) as api:
        first = api.post("/v1/tci/execute", json={"language": "python", "code": "z = 7"}, headers=headers)
        assert first.status_code == 200, first.text
        session_id = first.json()["data"]["session_id"]
        body = {"language": "python", "code": "print(z * 6)", "session_id": session_id}
        again = api.post("/v1/tci/execute", json=body, headers=headers)
        assert again.json()["data"]["outputs"] == [{"type": "stdout", "data": "42\n"}]
        listed = api.get("/v1/tci/sessions", headers=headers).json()["data"]["sessions"]
        assert [s["id"] for s in listed] == [session_id]
        assert api.delete(f"/v1/tci/sessions/{session_id}", headers=headers).status_code < 300


async def test_kubernetes_replicas_take_turns_through_a_lease(kube_cluster: Cluster, tmp_path: Path) -> None:
    """Only the Lease holder's start() returns; a standby takes over once the holder stops renewing."""
    platform = _kubernetes(kube_cluster, tmp_path)
    election = {"leader_election": True, "lease_duration_seconds": 3, "renew_deadline_seconds": 2.5}
    settings = platform.make_settings()
    settings = settings.model_copy(
        update={"kubernetes": settings.kubernetes.model_copy(update={**election, "retry_period_seconds": 1})}
    )
    lost: list[str] = []
    leader = KubernetesBackend(settings, on_lost_leadership=lambda: lost.append("leader"))
    standby = KubernetesBackend(settings, on_lost_leadership=lambda: lost.append("standby"))
    await asyncio.wait_for(leader.start(), timeout=20)
    holder = kube_cluster.lease_holder_sync(settings.kubernetes.namespace, settings.kubernetes.lease_name)
    assert holder is not None
    waiting = asyncio.create_task(standby.start())
    try:

        async def standby_tried() -> bool:
            return (
                "PUT",
                f"/apis/coordination.k8s.io/v1/namespaces/{settings.kubernetes.namespace}/leases/"
                f"{settings.kubernetes.lease_name}",
            ) in kube_cluster.requests or waiting.done()

        await _eventually(standby_tried, "the standby to contend for the lease")
        assert not waiting.done()
        await leader.close()  # stops renewing: the standby must take over within the lease's duration
        await asyncio.wait_for(waiting, timeout=20)
        new_holder = kube_cluster.lease_holder_sync(settings.kubernetes.namespace, settings.kubernetes.lease_name)
        assert new_holder not in {None, holder}
        await standby.list()  # the new leader works
    finally:
        waiting.cancel()
        await standby.close()
    assert lost == []


async def test_kubernetes_execute_costs_no_api_request_and_attach_speaks_v5(
    kube_cluster: Cluster, tmp_path: Path
) -> None:
    platform = _kubernetes(kube_cluster, tmp_path)
    async with _control_plane(platform) as (_, manager):
        result = await manager.execute("team-a", None, "n = 1", None, timeout=20)
        before = len(kube_cluster.requests)
        for _ in range(3):
            await manager.execute("team-a", result.session_id, "n += 1", None, timeout=20)
        assert kube_cluster.requests[before:] == []
    assert set(kube_cluster.attach_protocols) == {"v5.channel.k8s.io"}


async def test_kubernetes_pod_as_admitted_carries_the_hardening(kube_cluster: Cluster, tmp_path: Path) -> None:
    platform = _kubernetes(kube_cluster, tmp_path)
    settings = platform.make_settings()
    async with _control_plane(platform) as (backend, _):
        sandbox = await backend.create(None)
        (pod,) = [
            p for p in kube_cluster.pods_sync(settings.kubernetes.namespace) if p["metadata"]["name"] == sandbox.name
        ]
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["labels"][spec.INSTANCE] == settings.instance


async def test_kubernetes_claim_survives_a_stale_resource_version(kube_cluster: Cluster, tmp_path: Path) -> None:
    """A warm pod changed by someone else since we looked is re-read and claimed, not lost."""
    platform = _kubernetes(kube_cluster, tmp_path)
    namespace = platform.make_settings().kubernetes.namespace
    async with _control_plane(platform) as (backend, _):
        warm = await backend.create(None)
        await backend.list()
        kube_cluster.touch_sync(namespace, warm.sandbox_id)
        claim = _claim()
        claimed = await backend.claim(warm, claim)
        assert claimed.claim == claim
        patches = [r for r in kube_cluster.requests if r[0] == "PATCH" and r[1].endswith(warm.sandbox_id)]
        assert len(patches) == 2  # the stale one (409), then the one after re-reading
        (listed,) = await backend.list()
        assert listed.claim == claim


async def test_kubernetes_a_start_cancelled_as_its_watch_closes_returns_the_connection(
    kube_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown that cancels a pod's start just as its watch is being closed leaks no connection.

    kubernetes_asyncio's ``Watch.close()`` awaits a client of its own before it releases the watch's
    response; the cancellation is made to arrive exactly there.
    """
    platform = _kubernetes(kube_cluster, tmp_path)
    closing = asyncio.Event()
    close, next_event = ApiClient.close, Watch.next
    responses: list[Any] = []

    async def close_slowly(self: ApiClient) -> None:
        await close(self)
        if not closing.is_set():  # the first close is the watch's own client; later ones go on
            closing.set()
            await asyncio.sleep(3600)  # where the cancellation arrives

    async def recording_next(self: Watch) -> Any:
        try:
            return await next_event(self)
        finally:
            if self.resp is not None and self.resp not in responses:
                responses.append(self.resp)

    async with _control_plane(platform) as (backend, _):
        monkeypatch.setattr(Watch, "next", recording_next)
        monkeypatch.setattr(ApiClient, "close", close_slowly)
        start = asyncio.create_task(backend.create(None))
        try:
            await asyncio.wait_for(closing.wait(), timeout=20)
        finally:
            start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
    assert responses, "the start watched its pod"
    # A response released or closed has handed its connection back.
    assert [response for response in responses if response.connection is not None] == []


@pytest.mark.docker
async def test_docker_a_claim_the_engine_applies_after_another_claim_gives_the_container_back(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine looks a rename's old name up before it waits for the container's lock: a claim
    that looked the warm name up while another claim held the lock is applied after that claim's
    second rename, from the winner's claimed name. Replayed deterministically by sending the late
    claim's first rename to the container's id, which the engine resolves the same way."""
    platform = _docker(request)
    first, late = platform.backend(), platform.backend()
    await first.start()
    await late.start()
    try:
        assert isinstance(late, DockerBackend)
        warm = await first.create(None)
        won = await first.claim(warm, _claim("team-a"))
        rename = late.client.api.rename
        monkeypatch.setattr(
            late.client.api, "rename", lambda ref, name: rename(warm.sandbox_id if ref == warm.name else ref, name)
        )
        with pytest.raises(SandboxTaken):
            await late.claim(warm, _claim("team-b"))
        (listed,) = [s for s in await first.list() if s.sandbox_id == warm.sandbox_id]
        assert listed.name == won.name
        assert listed.claim == won.claim
        assert listed.running
    finally:
        for sandbox in await first.list():
            await first.destroy(sandbox.sandbox_id)
        await first.close()
        await late.close()


@pytest.mark.docker
async def test_docker_a_claim_that_cannot_be_checked_leaves_a_sandbox_no_pool_takes(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the engine's event log does not reach back to the claim (it keeps only its last events),
    the claimer cannot tell whether it won: it gives up the sandbox without removing it (it may be
    another control plane's session), and the name it leaves keeps it out of every warm pool."""
    platform = _docker(request)
    backend = platform.backend()
    await backend.start()
    try:
        assert isinstance(backend, DockerBackend)
        warm = await backend.create(None)
        (listed,) = [s for s in await backend.list() if s.sandbox_id == warm.sandbox_id]
        assert listed.pristine
        monkeypatch.setattr(backend, "_renames", lambda sandbox_id, until: [])
        with pytest.raises(SandboxTaken):
            await backend.claim(warm, _claim())
        (listed,) = [s for s in await backend.list() if s.sandbox_id == warm.sandbox_id]
        assert listed.claim is None
        assert not listed.pristine
        assert listed.running
    finally:
        for sandbox in await backend.list():
            await backend.destroy(sandbox.sandbox_id)
        await backend.close()


@pytest.mark.docker
async def test_docker_a_create_cancelled_while_the_engine_creates_leaves_nothing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown cancels a pool fill mid-create; the engine call goes on in its worker thread and
    used to leave a container in state Created behind, owned by no one."""
    platform = _docker(request)
    backend = platform.backend()
    await backend.start()
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()
    try:
        assert isinstance(backend, DockerBackend)
        create_container = backend._create_container

        def held(config: dict[str, Any], *, claimed: bool) -> Any:
            entered.set()
            release.wait(20)
            try:
                return create_container(config, claimed=claimed)
            finally:
                returned.set()

        monkeypatch.setattr(backend, "_create_container", held)
        creating = asyncio.create_task(backend.create(None))

        async def seen(event: threading.Event) -> bool:
            return event.is_set()

        await _eventually(lambda: seen(entered), "the engine call to begin")
        creating.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await creating
        await _eventually(lambda: seen(returned), "the engine call to return")
        assert await backend.list() == []
    finally:
        release.set()
        for sandbox in await backend.list():
            await backend.destroy(sandbox.sandbox_id)
        await backend.close()
