"""SandboxFusion's routes on the real engine and image, one server (and its run lane) for the module.

The server has one run lane per tenant and waits 1 s for it, so the saturation test can fill it
with one slow request; every other test runs one request at a time on that same lane, which also
shows that nothing of one request survives into the next.
"""

from __future__ import annotations

import base64
import concurrent.futures
import secrets
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends import labels
from orchestrator.settings import SandboxSettings, Settings

from .conftest import IMAGE, RUN_PREFIX, our_containers, remove_labelled, wait_for

pytestmark = pytest.mark.docker


def _settings(run_id: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "backend": "docker",
        "instance": run_id,
        "test_run_label": run_id,
        "sandbox": SandboxSettings(image=IMAGE),
        "pool_size": 0,
        "reaper_interval_seconds": 3600,
        "log_format": "console",
        "run_code_sandboxes": 1,
        "run_code_wait_seconds": 1,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="module")
def server(docker_client: docker.DockerClient) -> Iterator[tuple[TestClient, str]]:
    run_id = RUN_PREFIX + secrets.token_hex(6)
    try:
        with TestClient(create_app(_settings(run_id))) as client:
            yield client, run_id
    finally:
        remove_labelled(docker_client, f"{labels.TEST_RUN}={run_id}")


@pytest.fixture
def api(server: tuple[TestClient, str]) -> TestClient:
    return server[0]


def run_code(api: TestClient, code: str, language: str = "python", **extra: Any) -> dict[str, Any]:
    response = api.post("/run_code", json={"code": code, "language": language, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_ping(api: TestClient) -> None:
    response = api.get("/v1/ping")
    assert (response.status_code, response.text) == (200, "pong")


def test_python_runs_as_a_program_with_stdin_and_an_exit_code(api: TestClient) -> None:
    code = "import sys\nname = input()\nprint(f'hello {name}', __name__)\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    body = run_code(api, code, stdin="world\n")
    assert body["status"] == "Failed", body
    assert body["message"] == ""
    assert body["compile_result"] is None
    run = body["run_result"]
    assert (run["status"], run["return_code"]) == ("Finished", 3)
    assert (run["stdout"], run["stderr"]) == ("hello world __main__\n", "oops\n")
    assert run["execution_time"] > 0
    assert body["executor_pod_name"]
    assert body["oom"] is False
    ok = run_code(api, "print(sum(map(int, input().split())))", stdin="1 2 3")
    assert (ok["status"], ok["run_result"]["stdout"], ok["run_result"]["return_code"]) == ("Success", "6\n", 0)


def test_timeout_is_time_limit_exceeded(api: TestClient) -> None:
    body = run_code(api, "print('started', flush=True)\nwhile True: pass", run_timeout=1)
    assert body["status"] == "Failed"
    run = body["run_result"]
    assert (run["status"], run["return_code"], run["stdout"]) == ("TimeLimitExceeded", None, "started\n")


def test_bash_and_pytest(api: TestClient) -> None:
    bash = run_code(api, 'read n; echo "$((n * 2))"; ls', "bash", stdin="21\n")
    assert (bash["status"], bash["run_result"]["stdout"]) == ("Success", "42\nmain.sh\n")
    tests = "def test_ok():\n    assert 1 + 1 == 2\n\ndef test_bad():\n    assert 1 + 1 == 3\n"
    failed = run_code(api, tests, "pytest")
    assert (failed["status"], failed["run_result"]["return_code"]) == ("Failed", 1)
    assert "1 failed, 1 passed" in failed["run_result"]["stdout"]
    passed = run_code(api, tests, "pytest", args=["-k", "ok"])
    assert (passed["status"], passed["run_result"]["return_code"]) == ("Success", 0)


def test_output_is_capped_with_a_note(api: TestClient) -> None:
    body = run_code(api, "import sys\nsys.stdout.write('x' * 1_500_000)\nprint('tail', file=sys.stderr)")
    stdout = body["run_result"]["stdout"]
    dropped = 1_500_000 - 2**20
    assert stdout == "x" * 2**20 + f"\n[stdout truncated: {dropped} bytes dropped]\n"
    assert (body["status"], body["run_result"]["stderr"]) == ("Success", "tail\n")


def test_languages_beyond_the_image_are_a_sandbox_error_and_unknown_ones_a_422(api: TestClient) -> None:
    body = run_code(api, "int main() { return 0; }", "cpp")
    assert body["status"] == "SandboxError"
    assert "'cpp' is not available" in body["message"]
    assert "python" in body["message"]
    assert body["run_result"] is None
    response = api.post("/run_code", json={"code": "x", "language": "cobol"})
    assert response.status_code == 422
    assert api.post("/run_code", json={"language": "python"}).status_code == 422


def test_files_in_and_binary_files_out(api: TestClient) -> None:
    blob = bytes(range(256))
    code = (
        "data = open('data/in.bin', 'rb').read()\n"
        "open('out.bin', 'wb').write(data[::-1])\n"
        "print(len(data), open('notes.txt').read())\n"
    )
    files = {"data/in.bin": base64.b64encode(blob).decode(), "notes.txt": base64.b64encode(b"hi").decode()}
    body = run_code(api, code, files=files, fetch_files=["out.bin", "missing.bin"])
    assert (body["status"], body["run_result"]["stdout"]) == ("Success", "256 hi\n")
    assert body["files"] == {"out.bin": base64.b64encode(blob[::-1]).decode()}
    refused = run_code(api, "print(1)", files={"/etc/passwd": "aA=="})
    assert refused["status"] == "SandboxError"
    assert refused["message"].startswith("invalid request: file name must be relative")


def test_memory_limit_kills_with_the_oom_flag(api: TestClient) -> None:
    code = (
        "import time\nblocks = []\nfor _ in range(40):\n    blocks.append(bytearray(10 * 2**20))\n    time.sleep(0.02)"
    )
    body = run_code(api, code, memory_limit_MB=100)
    assert body["status"] == "Failed"
    assert body["oom"] is True
    assert "out of memory" in body["message"]
    assert "100 MiB" in body["message"]
    assert body["run_result"]["return_code"] == -9
    # Within the limit, the same allocation pattern passes.
    small = run_code(api, code.replace("range(40)", "range(3)"), memory_limit_MB=100)
    assert (small["status"], small["oom"]) == ("Success", False)


def test_nothing_of_one_request_reaches_the_next(api: TestClient) -> None:
    plant = (
        "import os, subprocess, pathlib\n"
        "subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "for d in ('/tmp', '/dev/shm', os.path.expanduser('~'), '/home/sandbox', '/workspace', '.'):\n"
        "    pathlib.Path(d, 'planted').write_text('x')\n"
        "print(os.getcwd())\n"
    )
    first = run_code(api, plant)
    assert first["status"] == "Success", first
    check = (
        "import os\n"
        "dirs = ('/tmp', '/dev/shm', '/home/sandbox', '/workspace', '.')\n"
        "left = [d for d in dirs if os.path.exists(os.path.join(d, 'planted'))]\n"
        "cmds = [open(f'/proc/{p}/cmdline', 'rb').read() for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(left, any(c.startswith(b'sleep') for c in cmds), os.getcwd())\n"
    )
    second = run_code(api, check)
    assert second["executor_pod_name"] == first["executor_pod_name"]  # the same lane
    left, sleeping, cwd = second["run_result"]["stdout"].split(" ", 2)
    assert (left, sleeping) == ("[]", "False")
    assert cwd.strip() != first["run_result"]["stdout"].strip()


def test_run_jupyter_runs_cells_in_one_kernel_and_reports_an_error_cell(
    api: TestClient, server: tuple[TestClient, str], docker_client: docker.DockerClient
) -> None:
    before = {c.id for c in our_containers(docker_client, server[1])}
    body = {
        "cells": ["a = 123", "a", "print(a); import sys; sys.stderr.write('err')", "raise RuntimeError('boom')"],
        "files": {"in.txt": base64.b64encode(b"payload").decode()},
        "fetch_files": ["in.txt"],
    }
    response = api.post("/run_jupyter", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert (data["status"], data["message"]) == ("Success", "")
    assert data["driver"]["status"] == "Finished"
    cells = data["cells"]
    assert len(cells) == 4
    assert cells[1]["display"] == [{"text/plain": "123"}]
    assert (cells[2]["stdout"], cells[2]["stderr"]) == ("123\n", "err")
    assert [(e["ename"], e["evalue"]) for e in cells[3]["error"]] == [("RuntimeError", "boom")]
    assert any("RuntimeError" in line for line in cells[3]["error"][0]["traceback"])
    assert data["files"] == {"in.txt": base64.b64encode(b"payload").decode()}
    # Its session was removed afterwards (the pool may have started a replacement meanwhile).
    wait_for(
        lambda: data["executor_pod_name"] not in {c.id[:12] for c in our_containers(docker_client, server[1])},
        30,
        "the run_jupyter sandbox to be removed",
    )
    assert before  # the lane and pool of this module were there before
    timed = api.post("/run_jupyter", json={"cells": ["1", "import time; time.sleep(30)"], "total_timeout": 1}).json()
    assert (timed["status"], timed["driver"]["status"]) == ("Failed", "TimeLimitExceeded")
    assert timed["message"] == "the cells ran longer than their time limit (1 s in total)"
    # The limit that was reached is the one named (it blamed the 45 s total).
    cell = {"cells": ["import time; time.sleep(30)"], "cell_timeout": 0.5}
    per_cell = api.post("/run_jupyter", json=cell).json()
    assert (per_cell["status"], per_cell["driver"]["status"]) == ("Failed", "TimeLimitExceeded")
    assert per_cell["message"] == "a cell ran longer than its time limit (0.5 s per cell)"


def test_a_busy_lane_answers_504_with_retry_after(api: TestClient) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(run_code, api, "sleep 4; echo done", "bash")
        wait_for(lambda: _lane_leased(api), 20, "the slow request to hold the lane")
        response = api.post("/run_code", json={"code": "print(1)", "language": "python"})
        assert response.status_code == 504
        assert int(response.headers["retry-after"]) >= 1
        assert slow.result(timeout=60)["run_result"]["stdout"] == "done\n"


def _lane_leased(api: TestClient) -> bool:
    # The lifespan's services hold the lanes; the TestClient keeps the lifespan state.
    return bool(api.app_state["services"].lanes.counts()["leased"] > 0)


def test_auth_in_production_mode(docker_client: docker.DockerClient) -> None:
    run_id = RUN_PREFIX + secrets.token_hex(6)
    settings = _settings(run_id, mode="production", api_keys={"sk-prod": "prod"}, pool_size=0)
    try:
        with TestClient(create_app(settings)) as client:
            response = client.post("/run_code", json={"code": "print(1)", "language": "python"})
            assert response.status_code == 401
            assert "ORCH_RUN_CODE_TENANT" in response.json()["error"]["message"]
            wrong = client.post(
                "/run_code", json={"code": "1", "language": "python"}, headers={"Authorization": "Bearer x"}
            )
            assert wrong.status_code == 401
            keyed = client.post(
                "/run_code",
                json={"code": "print(1)", "language": "python"},
                headers={"Authorization": "Bearer sk-prod"},
            )
            assert (keyed.status_code, keyed.json()["run_result"]["stdout"]) == (200, "1\n")
            # Run lanes are sessions of the tenant: counted, but neither listed nor reachable by id.
            listed = client.get("/tci/sessions", headers={"Authorization": "Bearer sk-prod"}).json()
            assert listed["data"]["sessions"] == []
        named = settings.model_copy(update={"run_code_tenant": "rl-loop"})
        with TestClient(create_app(named)) as client:
            response = client.post("/run_code", json={"code": "print(2)", "language": "python"})
            assert (response.status_code, response.json()["run_result"]["stdout"]) == (200, "2\n")
            assert client.app_state["services"].lanes.counts()["idle"] == 1
    finally:
        remove_labelled(docker_client, f"{labels.TEST_RUN}={run_id}")


# -- verl's reward client, replayed from its documented behaviour ------------------------------------
# It POSTs {compile_timeout, run_timeout, code, stdin, language, files: {}, fetch_files: []} to the URL,
# retries only a 504 (3 attempts, 1 s then 2 s apart), treats any other HTTP error as a failed call,
# and scores: call failed or SandboxError -1; compile error or compile time-out -4; run time-out -3;
# run error or non-zero exit -2; otherwise stdout == expected (trailing newlines stripped).


def verl_call(
    api: TestClient, code: str, stdin: str, timeout: int, language: str, seen: list[int] | None = None
) -> tuple[Any, str | None]:
    payload = {
        "compile_timeout": timeout,
        "run_timeout": timeout,
        "code": code,
        "stdin": stdin,
        "language": language,
        "files": {},
        "fetch_files": [],
    }
    error = None
    for attempt in range(3):
        response = api.post("/run_code", json=payload, headers={"Accept": "application/json"})
        if seen is not None:
            seen.append(response.status_code)
        if response.status_code == 504:
            error = "gateway timeout"
            if attempt < 2:
                time.sleep(attempt + 1)  # the client's own back-off, not a synchronisation
            continue
        if response.status_code >= 400:
            return None, f"HTTP {response.status_code}"
        return response.json(), None
    return None, error


def verl_score(answer: Any, error: str | None, expected: str) -> int | bool:
    if error is not None or answer is None or answer.get("status") == "SandboxError":
        return -1
    compile_result, run_result = answer.get("compile_result"), answer.get("run_result")
    if answer["status"] == "Failed":
        if compile_result and (
            compile_result["status"] in {"Error", "TimeLimitExceeded"} or compile_result.get("return_code") != 0
        ):
            return -4
        if not run_result:
            return -1
        if run_result["status"] == "TimeLimitExceeded":
            return -3
        if run_result["status"] == "Error" or run_result.get("return_code") != 0:
            return -2
        return -1
    if answer["status"] == "Success" and run_result and run_result["status"] == "Finished":
        return bool((run_result.get("stdout") or "").rstrip("\n") == expected.rstrip("\n"))
    return -1


@pytest.mark.parametrize(
    ("code", "language", "expected", "score"),
    [
        ("print(int(input()) * 2)", "python", "42", True),
        ("print(int(input()) * 2 + 1)", "python", "42", False),
        ("print(int(input()) / 0)", "python", "42", -2),
        ("import sys; sys.exit(2)", "python", "42", -2),
        ("while True: pass", "python", "42", -3),
        ('read n; echo "$((n * 2))"', "bash", "42", True),
        ("int main() { return 0; }", "cpp", "42", -1),
    ],
    ids=["pass", "wrong-answer", "runtime-error", "exit-code", "time-out", "bash", "sandbox-error"],
)
def test_verl_reward_client_scores(api: TestClient, code: str, language: str, expected: str, score: int | bool) -> None:
    answer, error = verl_call(api, code, "21\n", 1, language)
    got = verl_score(answer, error, expected)
    assert (type(got), got) == (type(score), score), answer


def test_verl_compile_failure_scores_minus_four_on_our_answer_model() -> None:
    # No language of this image compiles (SandboxFusion's Python has no compile step either), so -4 is
    # checked on our own response model carrying a compile failure, the shape its compiled languages send.
    from orchestrator.sandbox_fusion import CommandRunResult, RunCodeResponse

    answer = RunCodeResponse(
        status="Failed",
        message="",
        compile_result=CommandRunResult(status="Finished", return_code=1, stderr="error: expected ';'"),
    ).model_dump()
    assert verl_score(answer, None, "42") == -4


def test_verl_retries_a_504_and_then_scores(api: TestClient) -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(run_code, api, "sleep 3", "bash")
        wait_for(lambda: _lane_leased(api), 20, "the slow request to hold the lane")
        seen: list[int] = []
        answer, error = verl_call(api, "print(int(input()) * 2)", "21", 5, "python", seen)
        assert verl_score(answer, error, "42") is True
        assert seen[0] == 504
        assert seen[-1] == 200
        assert slow.result(timeout=60)["status"] == "Success"


@pytest.mark.parametrize("total_timeout", [1e6, 1e308])
def test_run_jupyter_caps_a_huge_total_timeout(api: TestClient, total_timeout: float) -> None:
    # The runner refuses limits over a day; the route caps them as /run_code caps run_timeout.
    response = api.post("/run_jupyter", json={"cells": ["print(6 * 7)"], "total_timeout": total_timeout})
    assert response.status_code == 200, response.text
    data = response.json()
    assert (data["status"], data["driver"]["status"]) == ("Success", "Finished"), data
    assert data["cells"][0]["stdout"] == "42\n"
