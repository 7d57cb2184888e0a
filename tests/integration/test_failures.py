"""Failures through the API on the real engine and image: what the caller gets, and that code never runs twice.

One uvicorn server (a real HTTP server, for what the in-process client cannot show) serves the
module; cases that need other settings start their own.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends import labels

from .conftest import AUTH, RUN_PREFIX, docker_settings, live_server, remove_labelled, socket_dir, text_of, wait_for

pytestmark = pytest.mark.docker

MAX_BODY = 64 * 1024


class Api:
    """The module's server, spoken to over real HTTP."""

    def __init__(self, url: str, run_id: str) -> None:
        self.url = url
        self.run_id = run_id
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=120)

    def post(self, code: str, session_id: str | None = None, **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"code": code, "language": "python", **extra}
        if session_id is not None:
            body["session_id"] = session_id
        return self.http.post("/v1/tci/execute", json=body)

    def run(self, code: str, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
        response = self.post(code, session_id, **extra)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()["data"]
        return data

    def has_file(self, session_id: str, name: str) -> bool:
        """Whether the session's working directory holds ``name`` (file routes run beside an execute)."""
        listed = self.http.get(f"/v1/tci/sessions/{session_id}/files")
        assert listed.status_code == 200, listed.text
        return any(entry["name"] == name for entry in listed.json()["data"]["entries"])

    def start_busy(self, session_id: str, seconds: float, timeout: float) -> Callable[[float], httpx.Response]:
        """Start an execute that sleeps ``seconds`` (its limit ``timeout``) in a thread, and wait until its
        code runs; the function returned waits for its response."""
        result: dict[str, httpx.Response] = {}
        code = f"import time\nopen('busy', 'w').close()\ntime.sleep({seconds})"

        def send() -> None:
            result["response"] = self.post(code, session_id, timeout=timeout)

        thread = threading.Thread(target=send)
        thread.start()
        wait_for(lambda: self.has_file(session_id, "busy"), 30, "the execute to be running")

        def response(within: float) -> httpx.Response:
            thread.join(within)
            return result["response"]

        return response

    def session_ids(self) -> set[str]:
        listed = self.http.get("/v1/tci/sessions")
        assert listed.status_code == 200, listed.text
        return {session["id"] for session in listed.json()["data"]["sessions"]}


@pytest.fixture(scope="module")
def api(docker_client: docker.DockerClient) -> Iterator[Api]:
    run_id = RUN_PREFIX + secrets.token_hex(6)
    settings = docker_settings(run_id, max_queued_per_session=1, max_body_bytes=MAX_BODY)
    try:
        with live_server(settings) as url:
            client = Api(url, run_id)
            yield client
            client.http.close()
    finally:
        remove_labelled(docker_client, f"{labels.TEST_RUN}={run_id}")
        shutil.rmtree(socket_dir(run_id), ignore_errors=True)


def test_a_kernel_crash_is_reported_and_the_session_goes_on(api: Api) -> None:
    sid = api.run("kept = 1")["session_id"]
    crashed = api.run("import os\nprint('before', flush=True)\nos._exit(3)", sid)
    assert crashed["outcome"] == "kernel_died"
    assert crashed["state_lost"] is True
    assert "exited with status 3" in text_of(crashed, "error")
    after = api.run("print(globals().get('kept'), 6 * 7)", sid)
    assert after["outcome"] == "ok"
    assert text_of(after, "stdout") == "None 42\n"


def test_output_over_the_cap_is_cut_and_says_so(api: Api) -> None:
    data = api.run("print('x' * (3 * 1024 * 1024))\nprint('after the cap')")
    stdout = text_of(data, "stdout")
    assert stdout.startswith("x" * 1000)
    assert "after the cap" not in stdout
    assert "[stdout truncated:" in stdout
    assert len(stdout.encode()) < 1024 * 1024 + 1000


def test_code_that_ignores_the_interrupt_is_stopped_at_its_limit_and_restarted(api: Api) -> None:
    sid = api.run("kept = 1")["session_id"]
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    code += "print('stubborn', flush=True)\ntime.sleep(60)"
    stopped = api.run(code, sid, timeout=2)
    assert stopped["outcome"] == "timeout"
    assert stopped["state_lost"] is True
    assert text_of(stopped, "stdout") == "stubborn\n"
    assert "did not stop when interrupted" in text_of(stopped, "error")
    assert text_of(api.run("print(globals().get('kept'))", sid), "stdout") == "None\n"


def test_a_refused_upload_runs_nothing(api: Api) -> None:
    sid = api.run("import os\nos.makedirs('probe', exist_ok=True)")["session_id"]
    files = [
        {"name": "fine.txt", "content": "x", "encoding": "string"},
        {"name": "../escape.txt", "content": "x", "encoding": "string"},
    ]
    refused = api.post("open('probe/ran', 'w').close()", sid, files=files)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "invalid_file"
    assert error["param"] == "files[1].name"
    assert refused.headers["x-should-retry"] == "false"
    listing = api.run("import os\nprint(sorted(os.listdir('probe')), os.path.exists('fine.txt'))", sid)
    assert text_of(listing, "stdout") == "[] False\n"


def test_executes_queued_beyond_the_limit_get_429_and_nothing_runs_twice(api: Api) -> None:
    sid = api.run("count = 0")["session_id"]
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def send(code: str) -> None:
        response = api.post(code, sid)
        with lock:
            results.append(response)

    first = threading.Thread(target=send, args=("import time\ncount += 1\nopen('busy', 'w').close()\ntime.sleep(3)",))
    first.start()
    wait_for(lambda: api.has_file(sid, "busy"), 30, "the first execute to be running")
    others = [threading.Thread(target=send, args=("count += 1",)) for _ in range(3)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(60)
    statuses = sorted(response.status_code for response in results)
    assert statuses.count(429) >= 1, statuses
    assert set(statuses) <= {200, 429}, statuses
    for response in results:
        if response.status_code == 429:
            assert response.headers["retry-after"]
            assert response.headers["x-should-retry"] == "true"
            assert response.json()["error"]["code"]
    ran = statuses.count(200)
    assert text_of(api.run("print(count)", sid), "stdout") == f"{ran}\n"


def test_a_body_over_the_limit_is_refused_while_it_is_still_being_sent(api: Api) -> None:
    parts = urlsplit(api.url)
    chunk = b"x" * 4096
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        head = (
            "POST /v1/tci/execute HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\nAuthorization: {AUTH['Authorization']}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        conn.sendall(head.encode())
        conn.setblocking(False)
        answer = b""
        # Ten times the limit, a chunk at a time; the answer must come long before the end.
        while sent < 10 * MAX_BODY and b"\r\n\r\n" not in answer:
            try:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            try:
                answer += conn.recv(65536)
            except BlockingIOError:
                time.sleep(0.01)
        conn.setblocking(True)
        deadline = time.monotonic() + 10
        while b"}" not in answer.split(b"\r\n\r\n", 1)[-1] and time.monotonic() < deadline:
            answer += conn.recv(65536)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:500]
    assert sent < 10 * MAX_BODY, "the server read the whole body before refusing it"
    assert b'"code":"request_too_large"' in rest or b"request_too_large" in rest, rest[-500:]


def test_a_sandbox_that_stops_answering_mid_execute_ends_in_sandbox_lost(
    api: Api, docker_client: docker.DockerClient
) -> None:
    sid = api.run("kept = 1")["session_id"]
    (container,) = [
        c for c in docker_client.containers.list(filters={"label": f"{labels.INSTANCE}={api.run_id}"}) if sid in c.name
    ]
    response_of = api.start_busy(sid, 5, timeout=1)
    # Frozen mid-execute: no reply will come; the orchestrator gives up after the limit plus its slack.
    container.pause()
    try:
        response = response_of(120)
    finally:
        # The orchestrator removes the container once it gives up on it; if not yet, let it go.
        with contextlib.suppress(docker.errors.NotFound):
            container.reload()
            if container.status == "paused":
                container.unpause()
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["outcome"] == "sandbox_lost"
    assert data["state_lost"] is True
    assert "SandboxError" in text_of(data, "error")
    assert sid not in api.session_ids()
    gone = api.post("print(kept)", sid)
    assert gone.status_code == 404, gone.text


def test_a_session_that_expires_while_its_code_runs_says_so(docker_client, run_id, make_settings) -> None:
    settings = make_settings(session_lifespan_seconds=4, reaper_interval_seconds=1)
    with TestClient(create_app(settings)) as client:
        first = client.post("/v1/tci/execute", json={"code": "x = 1"}, headers=AUTH)
        sid = first.json()["data"]["session_id"]
        began = time.monotonic()
        response = client.post(
            "/v1/tci/execute",
            json={"code": "import time\ntime.sleep(60)", "session_id": sid, "timeout": 60},
            headers=AUTH,
        )
        assert time.monotonic() - began < 50, "the execute outlived its session"
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert data["outcome"] == "sandbox_lost"
        assert "SessionExpired" in text_of(data, "error")
        again = client.post("/v1/tci/execute", json={"code": "print(x)", "session_id": sid}, headers=AUTH)
        assert again.status_code == 404


def test_frames_forged_on_the_runner_socket_change_nothing(api: Api) -> None:
    sid = api.run("kept = 1")["session_id"]
    forge = (
        "import json, socket, struct\n"
        "def frame(message):\n"
        "    body = json.dumps(message).encode()\n"
        "    return struct.pack('>I', len(body)) + body\n"
        "forged = {'id': 'x', 'ok': True, 'result': {'outputs': [], 'outcome': 'ok'}}\n"
        "for payload in (b'\\x7f\\xff\\xff\\xffjunk', frame(forged)):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect('/run/tci-runner/runner.sock')\n"
        "    s.sendall(payload)\n"
        "    s.close()\n"
        "print('sent')"
    )
    sent = api.run(forge, sid)
    assert sent["outcome"] == "ok", sent
    assert text_of(sent, "stdout") == "sent\n"
    for _ in range(3):
        after = api.run("kept += 1\nprint(kept)", sid)
        assert after["outcome"] == "ok", after
    assert text_of(after, "stdout") == "4\n"
    assert sid in api.session_ids()


def test_exit_starts_a_new_interpreter_and_says_so(api: Api) -> None:
    sid = api.run("kept = 1")["session_id"]
    ended = api.run("print('bye')\nexit()", sid)
    assert ended["outcome"] == "ok"
    assert ended["state_lost"] is True
    assert text_of(ended, "stdout") == "bye\n"
    after = api.run("print(globals().get('kept'))", sid)
    assert after["outcome"] == "ok"
    assert after["state_lost"] is False
    assert text_of(after, "stdout") == "None\n"


def test_closed_standard_descriptors_come_back_at_the_next_cell(api: Api) -> None:
    sid = api.run("import os\nkept = 1\nos.close(1)\nos.close(2)")["session_id"]
    after = api.run("import subprocess\nprint(kept)\nsubprocess.run(['echo', 'child'])", sid)
    assert after["outcome"] == "ok"
    assert text_of(after, "stdout") == "1\nchild\n"


def test_an_execute_whose_session_is_deleted_meanwhile_says_so(api: Api) -> None:
    sid = api.run("kept = 1")["session_id"]
    response_of = api.start_busy(sid, 60, timeout=60)
    assert api.http.delete(f"/v1/tci/sessions/{sid}").status_code == 204
    response = response_of(60)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["outcome"] == "sandbox_lost"
    assert "SessionClosed" in text_of(data, "error"), data
    assert sid not in api.session_ids()


def test_a_streamed_execute_whose_session_is_deleted_keeps_what_it_streamed(api: Api) -> None:
    """The result said only SessionClosed: output the stream had already shown was missing from it."""
    sid = api.run("kept = 1")["session_id"]
    lines: list[str] = []

    def stream() -> None:
        code = "import time\nprint('start', flush=True)\nprint('more', flush=True)\ntime.sleep(60)"
        body = {"code": code, "session_id": sid}
        headers = {"Accept": "text/event-stream"}
        with api.http.stream("POST", "/v1/tci/execute", json=body, headers=headers) as response:
            lines.extend(response.iter_lines())

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for(lambda: sum(line.startswith("event: output") for line in list(lines)) == 2, 30, "the streamed output")
    assert api.http.delete(f"/v1/tci/sessions/{sid}").status_code == 204
    thread.join(60)
    result = next(line for line in lines if line.startswith('data: {"data"'))
    data = json.loads(result.removeprefix("data: "))["data"]
    assert data["outcome"] == "sandbox_lost"
    assert [o["type"] for o in data["outputs"]] == ["stdout", "error"], data
    assert data["outputs"][0]["data"] == "start\nmore\n"  # merged, as in any result
    assert "SessionClosed" in data["outputs"][1]["data"]
