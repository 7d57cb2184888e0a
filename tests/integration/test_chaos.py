"""The deployable orchestrator image under chaos: SIGKILLed mid-work, sandboxes killed behind its back,
the engine unreachable for a while.

The orchestrator runs from its own image (``deploy/orchestrator.Dockerfile``, as ``make up`` builds it),
started with testcontainers on the host's engine, exactly as compose runs it: the Docker socket and
the runner-socket directory mounted at the host's paths. testcontainers' reaper container cannot be
pulled without a registry, so it stays off and everything is removed by this run's label.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from orchestrator.backends import labels

from .conftest import AUTH, IMAGE, RUN_PREFIX, _unavailable, our_containers, remove_labelled, wait_for

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
# testcontainers reads the setting above when it is imported.
from testcontainers.core.container import DockerContainer

pytestmark = pytest.mark.docker

ORCH_IMAGE = os.environ.get("ORCH_TEST_ORCHESTRATOR_IMAGE", "tci-orchestrator:latest")
ENGINE_SOCKET = "/var/run/docker.sock"
GRACE = 3


class Deployed:
    """One orchestrator container of this run's instance; killed and started again by the tests."""

    def __init__(self, run_id: str, root: Path, env: dict[str, str], *, engine: str = ENGINE_SOCKET) -> None:
        settings = {
            "ORCH_INSTANCE": run_id,
            "ORCH_TEST_RUN_LABEL": run_id,
            "ORCH_SANDBOX__IMAGE": IMAGE,
            "ORCH_SOCKET_DIR": str(root / "sockets"),
            "ORCH_POOL_SIZE": "0",
            "ORCH_ORPHAN_GRACE_SECONDS": str(GRACE),
            "ORCH_REAPER_INTERVAL_SECONDS": "1",
            "ORCH_LOG_FORMAT": "console",
            "DOCKER_HOST": f"unix://{engine}",
            **env,
        }
        self.container = (
            DockerContainer(ORCH_IMAGE)
            .with_envs(**settings)
            .with_volume_mapping(ENGINE_SOCKET, ENGINE_SOCKET, "rw")
            .with_volume_mapping(str(root), str(root), "rw")
            .with_exposed_ports(8000)
            .with_kwargs(labels={labels.TEST_RUN: run_id})
        )
        self.container.start()
        self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://{self.container.get_container_host_ip()}:{self.container.get_exposed_port(8000)}"

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError, ConnectionError, docker.errors.DockerException):
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        return False

    def wait_ready(self) -> None:
        wait_for(self.ready, 60, f"the orchestrator to be ready:\n{self.logs()}")

    def logs(self) -> str:
        out, err = self.container.get_logs()
        return (out + err).decode(errors="replace")[-3000:]

    def kill(self) -> None:
        wrapped = self.container.get_wrapped_container()
        wrapped.kill(signal="SIGKILL")
        wait_for(lambda: wrapped.reload() or wrapped.status == "exited", 30, "the orchestrator to be dead")

    def restart(self) -> None:
        self.container.get_wrapped_container().start()
        self.wait_ready()

    def post(self, code: str, session_id: str | None = None, key: str = "sk-integration") -> httpx.Response:
        body: dict[str, Any] = {"code": code, "language": "python"}
        if session_id is not None:
            body["session_id"] = session_id
        return httpx.post(
            f"{self.url}/v1/tci/execute", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=90
        )

    def run(self, code: str, session_id: str | None = None) -> dict[str, Any]:
        response = self.post(code, session_id)
        assert response.status_code == 200, f"{response.text}\n{self.logs()}"
        data: dict[str, Any] = response.json()["data"]
        return data

    def listed(self) -> set[str]:
        response = httpx.get(f"{self.url}/v1/tci/sessions", headers=AUTH, timeout=10)
        assert response.status_code == 200, response.text
        return {s["id"] for s in response.json()["data"]["sessions"]}

    def stop(self) -> None:
        with contextlib.suppress(docker.errors.DockerException):
            self.container.get_wrapped_container().remove(force=True)


class InFlight(threading.Thread):
    """A request the orchestrator is killed under: it must end in a connection error, never a reply."""

    def __init__(self, send: Callable[[], httpx.Response]) -> None:
        super().__init__(daemon=True)
        self._send = send
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = self._send()
        except httpx.TransportError as exc:
            self.error = exc

    def cut_off(self) -> bool:
        self.join(30)
        return self.response is None and self.error is not None


@pytest.fixture
def chaos(docker_client: docker.DockerClient) -> Iterator[tuple[str, Path]]:
    try:
        docker_client.images.get(ORCH_IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"orchestrator image {ORCH_IMAGE} is missing: run `make orchestrator-image`")
    run_id = RUN_PREFIX + secrets.token_hex(6)
    # Short: Unix socket paths have a 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="tci-chaos-"))
    try:
        yield run_id, root
    finally:
        remove_labelled(docker_client, f"{labels.TEST_RUN}={run_id}")
        shutil.rmtree(root, ignore_errors=True)


def accounted(deployed: Deployed, docker_client: docker.DockerClient, run_id: str, pool: int) -> bool:
    """Every container of the instance is a listed session of ours or one of at most ``pool`` warm ones."""
    listed = deployed.listed()
    warm = 0
    for container in our_containers(docker_client, run_id):
        claim = labels.parse_claim(container.name)
        if claim is None:
            warm += 1
        elif claim.session_id not in listed:
            return False
    return warm <= pool


def session_container(docker_client: docker.DockerClient, run_id: str, session_id: str) -> Any:
    for container in our_containers(docker_client, run_id):
        claim = labels.parse_claim(container.name)
        if claim is not None and claim.session_id == session_id:
            return container
    raise AssertionError(f"no container for {session_id}: {[c.name for c in our_containers(docker_client, run_id)]}")


def has_file(container: Any, path: str) -> bool:
    return bool(container.exec_run(["test", "-e", path]).exit_code == 0)


RUN_ONCE = (
    "import os, time\nopen('/workspace/started', 'w').close()\ntime.sleep(2)\n"
    "with open('/workspace/runs', 'a') as f: f.write('x')"
)
RAN = "import os, time\nprint(open('/workspace/runs').read() if os.path.exists('/workspace/runs') else '', end='')"


def test_sigkill_mid_work_leaves_nothing_unaccounted_and_never_runs_code_twice(docker_client, chaos):
    run_id, root = chaos
    deployed = Deployed(run_id, root, {})
    try:
        # During an execute: the client is cut off, the code finishes once, the session and its state stay.
        sid = deployed.run("x = 42")["session_id"]
        container = session_container(docker_client, run_id, sid)
        request = InFlight(lambda: deployed.post(RUN_ONCE, sid))
        wait_for(lambda: has_file(container, "/workspace/started"), 30, "the code to start")
        deployed.kill()
        assert request.cut_off(), request.response
        deployed.restart()
        wait_for(lambda: has_file(container, "/workspace/runs"), 30, "the cut-off code to finish")
        after = deployed.run(RAN + "\nprint('', x)", sid)
        assert after["outputs"] == [{"type": "stdout", "data": "x 42\n"}], after

        # During a cold create: whatever the killed request left is adopted as a session or removed.
        before = {c.id for c in our_containers(docker_client, run_id)}
        request = InFlight(lambda: deployed.post("with open('/workspace/runs', 'a') as f: f.write('c')"))
        wait_for(lambda: {c.id for c in our_containers(docker_client, run_id)} - before, 60, "a new container")
        deployed.kill()
        assert request.cut_off(), request.response
        deployed.restart()
        wait_for(lambda: accounted(deployed, docker_client, run_id, 0), GRACE + 30, "every container accounted for")
        for other in deployed.listed() - {sid}:
            assert deployed.run(RAN, other)["outputs"] in ([], [{"type": "stdout", "data": "c"}])

        # During a reaper pass: expiring sessions are removed after the restart all the same.
        deployed.stop()
        # Long enough for both cold starts to finish first on a slow day (the reaper ends a session still starting).
        deployed = Deployed(run_id, root, {"ORCH_SESSION_LIFESPAN_SECONDS": "12"})
        expiring = {deployed.run("pass")["session_id"] for _ in range(2)}

        def left() -> set[str]:
            claims = (labels.parse_claim(c.name) for c in our_containers(docker_client, run_id))
            return {claim.session_id for claim in claims if claim is not None} & expiring

        wait_for(lambda: len(left()) < len(expiring), 40, "the reaper to start removing")
        deployed.kill()
        deployed.restart()
        wait_for(lambda: not left(), 30, "every expired session removed")
    finally:
        deployed.stop()


def test_sigkill_during_pool_claim_and_refill(docker_client, chaos):
    run_id, root = chaos
    deployed = Deployed(run_id, root, {"ORCH_POOL_SIZE": "2"})
    try:
        pool = lambda: httpx.get(f"{deployed.url}/readyz", timeout=5).json()["checks"]["pool"]["ready"]  # noqa: E731
        wait_for(lambda: pool() == 2, 90, "the pool to fill")
        request = InFlight(lambda: deployed.post("print('claimed')"))

        def claimed() -> bool:
            return any(labels.parse_claim(c.name) for c in our_containers(docker_client, run_id))

        wait_for(claimed, 30, "a warm container to be claimed")
        deployed.kill()  # the refill has just begun
        request.join(30)
        deployed.restart()
        wait_for(lambda: accounted(deployed, docker_client, run_id, 2), GRACE + 30, "every container accounted for")
        wait_for(lambda: pool() == 2, 90, "the pool to fill again")
        for sid in deployed.listed():
            assert deployed.run("print(1)", sid)["outcome"] == "ok"
    finally:
        deployed.stop()


def test_sandbox_killed_or_removed_behind_our_back(docker_client, chaos):
    run_id, root = chaos
    # Another deployment's container on the same engine: older than the grace, and never ours to remove.
    neighbour = docker_client.containers.create(
        IMAGE,
        name=f"tci.{run_id}x.pool.neighbour",
        labels=labels.make_labels(f"{run_id}x", "other", 0, run_id),
        network_mode="none",
    )
    deployed = Deployed(run_id, root, {})
    try:
        killed = deployed.run("x = 1")["session_id"]
        removed = deployed.run("x = 2")["session_id"]
        victims = [session_container(docker_client, run_id, sid) for sid in (killed, removed)]
        victims[0].kill()
        victims[1].remove(force=True)
        for sid in (killed, removed):
            response = deployed.post("print(x)", sid)
            assert response.status_code in {200, 404}, response.text
            if response.status_code == 200:
                assert response.json()["data"]["outcome"] == "sandbox_lost", response.text
            else:
                assert response.json()["error"]["code"] == "session_not_found"
        wait_for(lambda: not ({killed, removed} & deployed.listed()), 30, "the lost sessions to leave the listing")
        assert deployed.run("print('fresh')")["outputs"] == [{"type": "stdout", "data": "fresh\n"}]
        neighbour.reload()  # raises NotFound if a reaper pass took it
    finally:
        deployed.stop()


class EngineProxy:
    """A Unix socket in front of the engine's that the test can make refuse everything."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.refusing = threading.Event()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(ENGINE_SOCKET)
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def refuse(self) -> None:
        """From now on, and for the connections already open, the engine does not answer."""
        self.refusing.set()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.refuse()
        self._server.close()
        with self._lock:
            for sock in self._open:
                sock.close()


def test_engine_unreachable_answers_503_before_code_and_recovers_without_restart(docker_client, chaos):
    run_id, root = chaos
    proxy = EngineProxy(root / "engine.sock")
    deployed = Deployed(run_id, root, {}, engine=str(proxy.path))
    try:
        sid = deployed.run("x = 7")["session_id"]
        proxy.refuse()
        wait_for(lambda: httpx.get(f"{deployed.url}/readyz", timeout=10).status_code == 503, 30, "/readyz to fail")
        assert httpx.get(f"{deployed.url}/readyz", timeout=10).json()["status"] == "not_ready"
        refused = deployed.post("print('never runs')")
        assert refused.status_code == 503, refused.text
        # The documented envelope, and no retry: both SDKs would otherwise retry a 5xx on their own.
        envelope = refused.json()
        assert envelope["data"] is None, refused.text
        assert envelope["error"]["type"], refused.text
        assert envelope["error"]["code"], refused.text
        assert envelope["errors"] == [{"code": envelope["error"]["code"], "message": envelope["error"]["message"]}]
        assert refused.headers["x-should-retry"] == "false"
        # A live session does not need the engine: its runner answers over its own socket.
        kept = deployed.post("print(x)", sid)
        assert kept.status_code == 200, kept.text
        assert kept.json()["data"]["outputs"] == [{"type": "stdout", "data": "7\n"}]
        proxy.refusing.clear()
        deployed.wait_ready()
        # A create may still meet a connection the outage broke: 503 again, nothing ran, the SDKs retry.
        back = wait_for(lambda: (r := deployed.post("print('back')")).status_code != 503 and r, 30, "a new session")
        assert back.status_code == 200, back.text
        assert back.json()["data"]["outputs"] == [{"type": "stdout", "data": "back\n"}]
        # Reaper passes that could not list the engine removed nothing.
        assert deployed.run("print(x)", sid)["outputs"] == [{"type": "stdout", "data": "7\n"}]
    finally:
        deployed.stop()
        proxy.close()


def test_storm_of_new_sessions_over_many_tenants(docker_client, chaos):
    """Every request answered: 200, or 429 with Retry-After (nothing ran); no 5xx; nothing left after."""
    run_id, root = chaos
    deployed = Deployed(run_id, root, {"ORCH_MAX_SESSIONS": "6", "ORCH_MAX_SESSIONS_PER_TENANT": "2"})
    try:

        async def storm() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=deployed.url, timeout=120) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            "/v1/tci/execute",
                            json={"code": "print(1)", "language": "python"},
                            headers={"Authorization": f"Bearer sk-tenant-{index % 20}"},
                        )
                        for index in range(100)
                    )
                )

        try:
            responses = asyncio.run(storm())
        except httpx.HTTPError as exc:
            raise AssertionError(f"a request got no answer:\n{deployed.logs()}") from exc
        statuses = Counter(response.status_code for response in responses)
        odd = [r.text for r in responses if r.status_code not in {200, 429}]
        assert not odd, f"{odd[:2]}\n{deployed.logs()}"
        assert 0 < statuses[200] <= 6, statuses
        assert all("retry-after" in r.headers for r in responses if r.status_code == 429)
        for response in responses:
            if response.status_code == 200:
                data = response.json()["data"]
                assert data["outputs"] == [{"type": "stdout", "data": "1\n"}]
                key = response.request.headers["authorization"]
                gone = httpx.delete(
                    f"{deployed.url}/v1/tci/sessions/{data['session_id']}", headers={"Authorization": key}, timeout=30
                )
                assert gone.status_code == 204, gone.text
        wait_for(lambda: not our_containers(docker_client, run_id), 30, "no session container left")
    finally:
        deployed.stop()
