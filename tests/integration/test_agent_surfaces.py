"""The agent extensions on the real engine and image: interrupt, per-request timeout, session files, streaming."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.settings import Settings

from .conftest import AUTH, execute, live_server, text_of, wait_for

pytestmark = pytest.mark.docker

OTHER = {"Authorization": "Bearer sk-someone-else"}
# Blocks until the test says go (by uploading the file `go`), so "still running" is a condition, not a time.
WAIT_FOR_GO = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.02)\n"


def names(api: TestClient, session_id: str, path: str = "") -> set[str]:
    response = api.get(f"/v1/tci/sessions/{session_id}/files", params={"path": path}, headers=AUTH)
    assert response.status_code == 200, response.text
    return {entry["name"] for entry in response.json()["data"]["entries"]}


@pytest.fixture
def files_api(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    settings = make_settings(execute_timeout_seconds=20, max_download_bytes=300_000, max_body_bytes=1_000_000)
    with TestClient(create_app(settings)) as client:
        yield client


def test_interrupt_stops_the_running_execute_and_keeps_state(api: TestClient) -> None:
    session_id = execute(api, "x = 41")["session_id"]
    code = "import time\nx += 1\nprint('working', flush=True)\nopen('started', 'w').close()\n"
    code += "while True:\n    time.sleep(0.02)"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(execute, api, code, session_id)
        wait_for(lambda: "started" in names(api, session_id), 30, "the cell to start")
        answer = api.post(f"/v1/tci/sessions/{session_id}/interrupt", headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"] == {"session_id": session_id, "interrupted": True}
        data = running.result(timeout=60)
    assert data["outcome"] == "interrupted"
    assert data["state_lost"] is False
    assert text_of(data, "stdout") == "working\n"
    assert "KeyboardInterrupt" in text_of(data, "error")
    assert text_of(execute(api, "print(x)", session_id), "stdout") == "42\n"
    idle = api.post(f"/tci/sessions/{session_id}/interrupt", headers=AUTH)
    assert idle.status_code == 200
    assert idle.json()["data"]["interrupted"] is False
    assert api.post(f"/v1/tci/sessions/{session_id}/interrupt", headers=OTHER).status_code == 404


def test_per_request_timeout(api: TestClient) -> None:
    data = execute(api, "import time\nprint('before', flush=True)\ntime.sleep(30)", timeout=1)
    assert data["outcome"] == "timeout"
    assert "exceeded the 1 s time limit" in text_of(data, "error")
    assert text_of(data, "stdout") == "before\n"
    assert text_of(execute(api, "print('still here')", data["session_id"]), "stdout") == "still here\n"
    bad = api.post("/v1/tci/execute", json={"code": "1", "language": "python", "timeout": -1}, headers=AUTH)
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "timeout"


def test_files_round_trip_binary_and_refuse_escapes(files_api: TestClient) -> None:
    api = files_api
    session_id = execute(api, "import os")["session_id"]
    base = f"/v1/tci/sessions/{session_id}/files"
    blob = bytes(range(256)) * 1000
    put = api.put(f"{base}/data/bin/blob.bin", content=blob, headers=AUTH)
    assert put.status_code == 200, put.text
    assert put.json()["data"] == {"path": "data/bin/blob.bin", "size": len(blob)}
    got = api.get(f"{base}/data/bin/blob.bin", headers=AUTH)
    assert got.status_code == 200, got.text
    assert got.content == blob
    assert got.headers["content-disposition"].startswith('attachment; filename="blob.bin"')
    assert got.headers["content-type"] == "application/octet-stream"
    # The code sees the upload byte for byte, and what the code writes comes back byte for byte.
    digest = execute(
        api, "import hashlib\nprint(hashlib.sha256(open('data/bin/blob.bin','rb').read()).hexdigest())", session_id
    )
    assert text_of(digest, "stdout").strip() == hashlib.sha256(blob).hexdigest()
    execute(api, "open('out.bin', 'wb').write(bytes(range(255, -1, -1)) * 3)\nos.makedirs('plots')", session_id)
    assert api.get(f"{base}/out.bin", headers=AUTH).content == bytes(range(255, -1, -1)) * 3
    listing = api.get(base, headers=AUTH).json()["data"]
    by_name = {entry["name"]: entry for entry in listing["entries"]}
    assert by_name["out.bin"]["type"] == "file"
    assert by_name["out.bin"]["size"] == 768
    assert by_name["data"]["type"] == "directory"
    assert by_name["plots"]["path"] == "plots"
    assert by_name["out.bin"]["modified_at"].endswith("Z")
    assert [e["path"] for e in api.get(base, params={"path": "data/bin"}, headers=AUTH).json()["data"]["entries"]] == [
        "data/bin/blob.bin"
    ]
    # Escapes: traversal, absolute paths, symlinks out, device files and FIFOs.
    execute(
        api,
        "os.symlink('/etc', 'etc_link')\nos.symlink('/etc/passwd', 'pw')\n"
        "os.symlink('/dev/zero', 'zero')\nos.mkfifo('fifo')",
        session_id,
    )
    refused = {
        "traversal": api.get(f"{base}/..%2F..%2Fetc%2Fpasswd", headers=AUTH),
        "traversal upload": api.put(f"{base}/a%2F..%2F..%2Fescape", content=b"x", headers=AUTH),
        "absolute": api.get(base, params={"path": "/etc"}, headers=AUTH),
        "listing outside": api.get(base, params={"path": ".."}, headers=AUTH),
        "through a symlink": api.get(f"{base}/etc_link/passwd", headers=AUTH),
        "a symlink out": api.get(f"{base}/pw", headers=AUTH),
        "upload through a symlink": api.put(f"{base}/etc_link/evil", content=b"x", headers=AUTH),
        "device": api.get(f"{base}/zero", headers=AUTH),
        "fifo": api.get(f"{base}/fifo", headers=AUTH),
        "directory": api.get(f"{base}/plots", headers=AUTH),
    }
    for case, response in refused.items():
        assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
        assert response.json()["error"]["type"] == "invalid_request_error", case
    assert "fifo" not in names(api, session_id)  # listings hold files and directories only
    # In a URL, a leading slash is folded into the one before it: still relative to the working directory.
    assert api.get(f"{base}/%2Fetc%2Fpasswd", headers=AUTH).status_code == 404
    # Size limits: the download limit, and the request body limit for uploads.
    execute(api, "open('big.bin', 'wb').write(b'0' * 400_000)", session_id)
    too_big = api.get(f"{base}/big.bin", headers=AUTH)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "file_too_large"
    assert api.put(f"{base}/huge.bin", content=b"0" * 1_500_000, headers=AUTH).status_code == 413
    # Missing files, deletes, and other tenants.
    assert api.get(f"{base}/nope.txt", headers=AUTH).status_code == 404
    assert api.delete(f"{base}/data", headers=AUTH).status_code == 204
    assert api.get(f"{base}/data/bin/blob.bin", headers=AUTH).status_code == 404
    assert api.delete(f"{base}/pw", headers=AUTH).status_code == 204  # the link, not /etc/passwd
    assert api.get(f"{base}/out.bin", headers=OTHER).status_code == 404
    assert api.get(base, headers=OTHER).json()["error"]["code"] == "session_not_found"
    assert api.put(f"{base}/x", content=b"x", headers=OTHER).status_code == 404
    assert api.delete(f"{base}/out.bin", headers=OTHER).status_code == 404
    assert api.get("/v1/tci/sessions/ses_unknownunknownunknown/files", headers=AUTH).status_code == 404
    assert "out.bin" in names(api, session_id)


def test_files_do_not_wait_for_a_running_execute(api: TestClient) -> None:
    session_id = execute(api, "x = 1")["session_id"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            execute, api, "open('started', 'w').close()\n" + WAIT_FOR_GO + "print(open('go').read())", session_id
        )
        wait_for(lambda: "started" in names(api, session_id), 30, "the cell to start")
        # The upload is what ends the cell: it cannot have waited for the cell.
        assert api.put(f"/tci/sessions/{session_id}/files/go", content=b"ready", headers=AUTH).status_code == 200
        data = running.result(timeout=60)
    assert data["outcome"] == "ok"
    assert text_of(data, "stdout") == "ready\n"


def _events(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event, data) per server-sent event; comments come as ("comment", text)."""
    event: str | None = None
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert event is not None
            yield event, json.loads(line.removeprefix("data: "))
            event = None


@pytest.fixture
def live(make_settings: Callable[..., Settings]) -> Iterator[str]:
    with live_server(make_settings(execute_timeout_seconds=20, stream_keepalive_seconds=0.2)) as url:
        yield url


def test_streaming_execute_sends_outputs_while_the_cell_runs(live: str) -> None:
    stream_headers = {**AUTH, "Accept": "text/event-stream"}
    with httpx.Client(base_url=live, timeout=60) as client:
        session_id = client.post("/v1/tci/execute", json={"code": "x = 5"}, headers=AUTH).json()["data"]["session_id"]
        code = "print('first', flush=True)\n" + WAIT_FOR_GO + "print('second', x)\n1 + 1"
        body = {"code": code, "language": "python", "session_id": session_id}
        seen: list[tuple[str, Any]] = []
        with client.stream("POST", "/v1/tci/execute", json=body, headers=stream_headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-session-id"] == session_id
            for event, data in _events(response):
                seen.append((event, data))
                first_seen = ("output", {"type": "stdout", "data": "first\n"}) in seen
                if event == "comment" and first_seen and not any(e == "go" for e, _ in seen):
                    # The cell is still running (it waits for this upload), and has streamed already.
                    put = client.put(f"/v1/tci/sessions/{session_id}/files/go", content=b"", headers=AUTH)
                    assert put.status_code == 200
                    seen.append(("go", None))
        kinds = [event for event, _ in seen if event != "comment"]
        assert kinds[0] == "output"
        assert kinds.index("go") < kinds.index("result") == len(kinds) - 1
        outputs = [data for event, data in seen if event == "output"]
        assert outputs[0] == {"type": "stdout", "data": "first\n"}
        assert {"type": "stdout", "data": "second 5\n"} in outputs
        result = seen[-1][1]
        assert result["data"]["outcome"] == "ok"
        assert result["data"]["session_id"] == session_id
        assert result["data"]["outputs"] == [
            {"type": "stdout", "data": "first\nsecond 5\n"},
            {"type": "execute_result", "data": {"text/plain": "2"}},
        ]
        assert outputs[-1] == {"type": "execute_result", "data": {"text/plain": "2"}}
        # Refused before the code starts: plain JSON, not a stream.
        unknown = client.post(
            "/tci/execute", json={"code": "1", "session_id": "ses_unknownunknownunknown"}, headers=stream_headers
        )
        assert unknown.status_code == 404
        assert unknown.headers["content-type"].startswith("application/json")
        bad_file = {
            "code": "1",
            "session_id": session_id,
            "files": [{"name": "../x", "encoding": "string", "content": ""}],
        }
        assert client.post("/tci/execute", json=bad_file, headers=stream_headers).status_code == 400


def test_a_client_leaving_a_stream_interrupts_the_execute_and_keeps_the_session(live: str) -> None:
    with httpx.Client(base_url=live, timeout=60) as client:
        session_id = client.post("/v1/tci/execute", json={"code": "y = 7"}, headers=AUTH).json()["data"]["session_id"]
        code = (
            # The print is inside the try: the interrupt may land while its flush still waits.
            "import time\ntry:\n    print('looping', flush=True)\n    while True:\n        time.sleep(0.02)\n"
            "except KeyboardInterrupt:\n    open('interrupted', 'w').close()\n    raise"
        )
        body = {"code": code, "session_id": session_id}
        with client.stream(
            "POST", "/tci/execute", json=body, headers={**AUTH, "Accept": "text/event-stream"}
        ) as response:
            for event, data in _events(response):
                if event == "output":
                    assert data == {"type": "stdout", "data": "looping\n"}
                    break  # leaving the block closes the connection mid-stream

        def listed() -> bool:
            entries = client.get(f"/tci/sessions/{session_id}/files", headers=AUTH).json()["data"]["entries"]
            return any(entry["name"] == "interrupted" for entry in entries)

        wait_for(listed, 30, "the abandoned execute to be interrupted")
        after = client.post("/tci/execute", json={"code": "print(y)", "session_id": session_id}, headers=AUTH)
        assert after.json()["data"]["outputs"] == [{"type": "stdout", "data": "7\n"}]
