"""Restart adoption, the reaper and the warm pool on the real engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends import labels

from .conftest import AUTH, IMAGE, execute, our_containers, socket_dir, text_of, wait_for

pytestmark = pytest.mark.docker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(run_id: str, port: int, log) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "ORCH_BACKEND": "docker",
        "ORCH_INSTANCE": run_id,
        "ORCH_TEST_RUN_LABEL": run_id,
        "ORCH_POOL_SIZE": "0",
        "ORCH_LOG_FORMAT": "console",
        "ORCH_SANDBOX__IMAGE": IMAGE,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            assert process.poll() is None, "server exited"
            return False

    wait_for(healthy, 60, "the server to become ready")
    return process


def _stdout(base: str, session_id: str, code: str) -> str:
    reply = httpx.post(f"{base}/execute", json={"code": code, "session_id": session_id}, headers=AUTH, timeout=60)
    assert reply.status_code == 200, reply.text
    return text_of(reply.json()["data"], "stdout")


def test_sigkill_restart_keeps_sessions_and_leaves_nothing_unaccounted(docker_client, run_id, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1/tci"
    with open(tmp_path / "server.log", "wb") as log:
        first = _serve(run_id, port, log)
        try:
            sid = httpx.post(f"{base}/execute", json={"code": "x = 42"}, headers=AUTH, timeout=60).json()["data"][
                "session_id"
            ]
            httpx.post(f"{base}/execute", json={"code": "y = x + 1", "session_id": sid}, headers=AUTH, timeout=60)
            # A run lane too: the next server removes it (it was listed and counted as a session).
            ran = httpx.post(
                f"http://127.0.0.1:{port}/run_code",
                json={"code": "print(1)", "language": "python"},
                headers=AUTH,
                timeout=60,
            )
            assert ran.json()["status"] == "Success", ran.text
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        second = _serve(run_id, port, log)
        try:
            assert _stdout(base, sid, "print(x, y)") == "42 43\n"
            listed = httpx.get(f"{base}/sessions", headers=AUTH, timeout=10).json()["data"]["sessions"]
            assert [(s["id"], s["execute_count"]) for s in listed] == [(sid, 3)]
            containers = our_containers(docker_client, run_id)
            assert [labels.parse_claim(c.name).session_id for c in containers] == [sid]
            assert [p.name for p in socket_dir(run_id).iterdir()] == [containers[0].labels[labels.CHANNEL]]
        finally:
            second.terminate()
            second.wait(timeout=30)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_sigterm_answers_running_code_and_the_next_server_does_not_run_it_again(docker_client, run_id, tmp_path):
    # uvicorn cancels what is still open when its shutdown grace ends: the client got a plain 500 and
    # both SDKs sent the code again to the next server, which ran it a second time; a stream ended
    # without its result.
    port = _free_port()
    base = f"http://127.0.0.1:{port}/v1/tci"
    code = "import time\nruns.append(1)\nopen('running', 'w').close()\ntime.sleep(60)"
    answers: dict[str, str | httpx.Response] = {}

    def send(sid: str) -> None:
        answers["json"] = httpx.post(
            f"{base}/execute", json={"code": code, "session_id": sid}, headers=AUTH, timeout=60
        )

    def stream(sid: str) -> None:
        headers = {**AUTH, "Accept": "text/event-stream"}
        body = {"code": code, "session_id": sid}
        with httpx.stream("POST", f"{base}/execute", json=body, headers=headers, timeout=60) as response:
            answers["stream"] = response.read().decode()

    def run_code() -> None:
        # A program in a run lane does not stop for the interrupt (a process group of its own).
        program = "import pathlib, time\npathlib.Path('/tmp/running-run').touch()\ntime.sleep(60)"
        body = {"code": program, "language": "python", "run_timeout": 60}
        answers["run_code"] = httpx.post(f"http://127.0.0.1:{port}/run_code", json=body, headers=AUTH, timeout=60)

    def run_started() -> bool:
        containers = our_containers(docker_client, run_id)
        return any(c.exec_run("test -e /tmp/running-run").exit_code == 0 for c in containers)

    with open(tmp_path / "server.log", "wb") as log:
        first = _serve(run_id, port, log)
        try:
            sids = [
                httpx.post(f"{base}/execute", json={"code": "runs = []"}, headers=AUTH, timeout=60).json()["data"][
                    "session_id"
                ]
                for _ in range(2)
            ]
            containers = our_containers(docker_client, run_id)
            senders = [
                threading.Thread(target=send, args=(sids[0],)),
                threading.Thread(target=stream, args=(sids[1],)),
                threading.Thread(target=run_code),
            ]
            for sender in senders:
                sender.start()
            for container in containers:
                wait_for(lambda c=container: c.exec_run("test -e /workspace/running").exit_code == 0, 30, "the code")
            wait_for(run_started, 60, "the /run_code program")
            first.send_signal(signal.SIGTERM)
            for sender in senders:
                sender.join(timeout=30)
            first.wait(timeout=30)  # uvicorn ends by raising the signal again: -15
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        response = answers["json"]
        assert isinstance(response, httpx.Response)
        assert response.status_code == 200, response.text
        assert response.json()["data"]["outcome"] == "interrupted"
        streamed = answers["stream"]
        assert isinstance(streamed, str)
        result = streamed.split("event: result\ndata: ", 1)[1].split("\n", 1)[0]
        assert json.loads(result)["data"]["outcome"] == "interrupted"
        # Cut off by the stop, not answered with what the cut program printed: a 504 that verl sends again
        # (it was a bare 500 once the server's grace ended).
        cut = answers["run_code"]
        assert isinstance(cut, httpx.Response)
        assert cut.status_code == 504, cut.text
        assert cut.headers["retry-after"] == "1"
        assert "stopping" in cut.json()["error"]["message"]
        second = _serve(run_id, port, log)
        try:
            for sid in sids:
                assert _stdout(base, sid, "print(runs)") == "[1]\n"
        finally:
            second.terminate()
            second.wait(timeout=30)
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_expired_session_is_reaped_within_one_interval(docker_client, run_id, make_settings):
    settings = make_settings(session_lifespan_seconds=3, reaper_interval_seconds=1)
    with TestClient(create_app(settings)) as api:
        sid = execute(api, "x = 1")["session_id"]
        assert our_containers(docker_client, run_id)
        wait_for(lambda: not our_containers(docker_client, run_id), 3 + 1 + 10, "the reaper to remove the container")
        # Its socket directory goes right after the container (the channel closes once the engine is done).
        wait_for(lambda: not socket_dir(run_id).exists(), 10, "the session's socket directory to go with it")
        response = api.post("/tci/execute", json={"code": "print(x)", "session_id": sid}, headers=AUTH)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "session_not_found"


def _reaper_passes(api: TestClient) -> float:
    """Completed reaper passes, from /metrics."""
    text = api.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('tci_reaper_runs_total{result="ok"}')
    )


def test_stray_containers_are_removed(docker_client, run_id, make_settings):
    settings = make_settings(reaper_interval_seconds=1, orphan_grace_seconds=0)
    stray = docker_client.containers.create(
        IMAGE, name=f"tci.{run_id}.pool.stray", labels=labels.make_labels(run_id, "other", 0, run_id),
        stdin_open=True, network_mode="none",
    )  # fmt: skip
    # Another orchestrator's container on the same engine (its own instance; our test label, for cleanup).
    foreign = docker_client.containers.create(
        IMAGE, name=f"tci.{run_id}x.pool.foreign", labels=labels.make_labels(f"{run_id}x", "other", 0, run_id),
        stdin_open=True, network_mode="none",
    )  # fmt: skip
    with TestClient(create_app(settings)) as api:
        wait_for(lambda: stray.id not in {c.id for c in our_containers(docker_client, run_id)}, 15, "stray removal")
        after = _reaper_passes(api) + 3
        wait_for(lambda: _reaper_passes(api) >= after, 15, "three more reaper passes")
    foreign.reload()  # raises NotFound if any pass touched it
    assert foreign.labels[labels.INSTANCE] == f"{run_id}x"


def test_warm_pool_hands_out_ready_containers_and_refills(docker_client, run_id, make_settings):
    with TestClient(create_app(make_settings(pool_size=1))) as api:
        wait_for(lambda: api.get("/readyz").json()["checks"]["pool"]["ready"] == 1, 60, "the pool to fill")
        [pooled] = our_containers(docker_client, run_id)
        assert labels.parse_claim(pooled.name) is None
        data = execute(api, "print('warm')")
        assert text_of(data, "stdout") == "warm\n"
        pooled.reload()
        claim = labels.parse_claim(pooled.name)
        assert claim is not None
        assert claim.session_id == data["session_id"]
        wait_for(lambda: api.get("/readyz").json()["checks"]["pool"]["ready"] == 1, 60, "the pool to refill")
        assert len(our_containers(docker_client, run_id)) == 2
        metrics = api.get("/metrics").text
        assert 'tci_pool_claims_total{result="hit"} 1.0' in metrics


def test_attach_channel_keeps_working_and_is_readopted(docker_client, run_id, make_settings):
    """The attach channel (remote engines, Docker Desktop, gVisor): no mount, the runner on stdio."""
    settings = make_settings(sandbox={"channel": "attach"})
    with TestClient(create_app(settings)) as api:
        sid = execute(api, "x = 5")["session_id"]
        [container] = our_containers(docker_client, run_id)
        attrs = docker_client.api.inspect_container(container.id)
        # No bind mount: only the image's own library trees, read-only volumes on the engine's side.
        assert all(m["Type"] == "volume" and m["Name"].startswith("tci-lib-") and not m["RW"] for m in attrs["Mounts"])
        assert attrs["Config"]["OpenStdin"] is True
    # A new process (same instance) re-adopts the session over a fresh attach.
    with TestClient(create_app(settings)) as api:
        assert text_of(execute(api, "print(x * 2)", sid), "stdout") == "10\n"


def test_a_warm_container_a_claim_was_interrupted_on_is_never_adopted(docker_client, run_id, make_settings):
    # Between a claim's two renames the container is named "<warm name>.taken"; a session may have run
    # there since (a claim the engine applied late). A restarted server must not hand it out as warm.
    settings = make_settings(pool_size=1, reaper_interval_seconds=3600)
    with TestClient(create_app(settings)) as api:
        wait_for(lambda: len(our_containers(docker_client, run_id)) == 1, 60, "the pool to fill")
        assert api.get("/healthz").status_code == 200
    (warm,) = our_containers(docker_client, run_id)
    assert labels.is_pool_name(warm.name)
    warm.rename(f"{warm.name}.taken")
    with TestClient(create_app(settings)):
        # Reconcile has run: the interrupted one is gone, and the pool refills with a new sandbox.
        names = {c.id: c.name for c in our_containers(docker_client, run_id)}
        assert warm.id not in names, names
