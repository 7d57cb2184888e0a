"""Session behaviour through the API: queueing, expiry and reaping, tenant caps."""

from __future__ import annotations

import ast
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api_support import KEY_A, KEY_B, App, auth, canary, check_error, running_app, stdout_of

Waiter = Callable[..., Any]


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_concurrent_executes_on_one_session_queue(app: App) -> None:
    key = "api-tests-queue"
    session_id = app.execute(key, "import time\nspans = []")["session_id"]
    # The sleep is in the user code: it keeps the first execute busy while the second arrives.
    code = "began = time.monotonic()\ntime.sleep(0.5)\nspans.append((began, time.monotonic()))"
    barrier = threading.Barrier(2)
    results: list[tuple[float, float, Any] | None] = [None, None]

    def send(index: int) -> None:
        barrier.wait(timeout=10)
        sent = time.monotonic()
        response = app.client.post("/tci/execute", json={"code": code, "session_id": session_id}, headers=auth(key))
        results[index] = (sent, time.monotonic(), response)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(result is not None for result in results)
    done = [result for result in results if result is not None]
    for _, _, response in done:
        assert response.status_code == 200, response.text  # queued: neither 409 nor 429
        assert response.json()["data"]["session_id"] == session_id
    # Both requests were in flight at the same time ...
    assert max(sent for sent, _, _ in done) < min(received for _, received, _ in done)
    # ... and their code ran one after the other.
    spans = ast.literal_eval(stdout_of(app.execute(key, "print(spans)", session_id)))
    assert len(spans) == 2
    (_, first_end), (second_start, _) = sorted(spans)
    assert first_end <= second_start
    (listed,) = app.sessions(key)
    assert listed["execute_count"] == 4


def test_expired_session_disappears_and_its_sandbox_is_reaped(wait_until: Waiter, tmp_path: Path) -> None:
    # A warm sandbox: the 2 s lifespan starts at the claim, so it is not eaten by a kernel cold start.
    with running_app(session_lifespan_seconds=2, reaper_interval_seconds=0.2, pool_size=1) as app:
        wait_until(
            lambda: app.client.get("/readyz").json()["checks"]["pool"]["ready"] == 1,
            timeout=30,
            message="the warm pool holds a ready sandbox",
        )
        data = app.execute(KEY_A, "import os\ncounter = 0\nprint(os.getpid(), os.getppid())")
        session_id = data["session_id"]
        kernel_pid, runner_pid = map(int, stdout_of(data).split())
        sandbox_id = f"local-{runner_pid}"
        assert sandbox_id in [s.sandbox_id for s in app.sandboxes()]
        assert [s["id"] for s in app.sessions(KEY_A)] == [session_id]

        wait_until(lambda: app.sessions(KEY_A) == [], timeout=10, message="the session leaves the list")
        marker = tmp_path / "ran"
        body = {"code": canary(marker), "session_id": session_id}
        check_error(app.client.post("/tci/execute", json=body, headers=auth(KEY_A)), 404, "session_not_found")
        wait_until(
            lambda: sandbox_id not in [s.sandbox_id for s in app.sandboxes()],
            timeout=10,
            message="the reaper removes the sandbox",
        )
        wait_until(
            lambda: not process_running(runner_pid) and not process_running(kernel_pid),
            timeout=10,
            message="the runner and kernel processes are gone",
        )
        assert not marker.exists()


def test_tenant_cap_refuses_new_sessions_with_429(tmp_path: Path) -> None:
    with running_app(max_sessions_per_tenant=1) as app:
        session_id = app.execute(KEY_A, "n = 1")["session_id"]
        marker = tmp_path / "ran"
        response = app.client.post("/tci/execute", json={"code": canary(marker)}, headers=auth(KEY_A))
        check_error(response, 429, "rate_limit_exceeded")
        assert int(response.headers["retry-after"]) >= 1
        assert not marker.exists()
        assert len(app.sandboxes()) == 1
        assert [s["id"] for s in app.sessions(KEY_A)] == [session_id]
        # The existing session still works, and the cap is per tenant.
        assert stdout_of(app.execute(KEY_A, "print(n)", session_id)) == "1\n"
        assert stdout_of(app.execute(KEY_B, "print('b')")) == "b\n"
        assert len(app.sandboxes()) == 2


class _Retries:
    """Executes sent to the session layer directly, each with a client that has or has not left.

    In one session made for them, or, ``fresh``, each in a new session unless it names one.
    """

    def __init__(self, app: App, key: str, *, fresh: bool = False) -> None:
        self.app = app
        self.key = key
        services = app.client.app_state["services"]
        self.manager = services.manager
        self.tenant = services.authenticator.tenant_for(f"Bearer {key}")
        self.session_id: str | None = None if fresh else app.execute(key, "ran = []")["session_id"]

    def send(self, code: str, gone: Callable[[], bool], session_id: str | None = None) -> Any:
        """Start an execute; its concurrent future."""

        async def left() -> bool:
            return gone()

        target = session_id or self.session_id
        call = functools.partial(self.manager.execute, self.tenant, target, code, None, 20.0, None, gone=left)
        portal = self.app.client.portal
        assert portal is not None
        return portal.start_task_soon(call)

    def started(self, name: str) -> bool:
        """Whether the code has written ``name`` (``fresh``: in the tenant's first listed session)."""
        session_id = self.session_id
        if session_id is None:
            # Raw: a new session is listed (with no execute counted yet) while its first execute runs.
            listed = self.app.client.get("/tci/sessions", headers=auth(self.key)).json()["data"]["sessions"]
            if not listed:
                return False
            session_id = listed[0]["id"]
        path = f"/tci/sessions/{session_id}/files/{name}"
        return self.app.client.get(path, headers=auth(self.key)).status_code == 200

    def abandoned(self, code: str, marker: str, wait_until: Waiter) -> Any:
        """Send ``code`` and, once it has written ``marker``, let its client go (as an SDK that timed out)."""
        left = threading.Event()
        first = self.send(code, left.is_set)
        wait_until(lambda: self.started(marker), timeout=20, message="the first attempt to start")
        left.set()
        return first

    def ran(self) -> str:
        return stdout_of(self.app.execute(self.key, "print(ran)", self.session_id))


def _slow(marker: str) -> str:
    # Over a second: an answer that quick is taken as received without asking its client.
    return f"ran.append(1)\nopen('{marker}', 'w').close()\nimport time\ntime.sleep(1.2)\nprint(len(ran))"


def test_a_retry_of_an_execute_whose_client_left_waits_for_it_instead_of_running_again(
    app: App, wait_until: Waiter
) -> None:
    retries = _Retries(app, "api-tests-retry-join")
    first = retries.abandoned(_slow("a"), "a", wait_until)  # its SDK then sends the same code again
    retry = retries.send(_slow("a"), lambda: False)
    assert retry.result(timeout=30) is first.result(timeout=30)
    assert retries.ran() == "[1]\n"


def test_a_retry_after_the_abandoned_execute_ended_gets_its_result_once(app: App, wait_until: Waiter) -> None:
    retries = _Retries(app, "api-tests-retry-replay")
    first = retries.send(_slow("b"), lambda: True)  # its client is gone before it ends
    answer = first.result(timeout=30)
    assert retries.send(_slow("b"), lambda: False).result(timeout=30) is answer
    assert retries.ran() == "[1]\n"
    # Once: the same code sent again after that is a new request, and runs.
    again = retries.send(_slow("b"), lambda: False).result(timeout=30)
    assert again is not answer
    assert retries.ran() == "[1, 1]\n"


def test_the_same_code_sent_twice_by_clients_still_waiting_runs_twice(app: App, wait_until: Waiter) -> None:
    retries = _Retries(app, "api-tests-retry-none")
    first = retries.send(_slow("c"), lambda: False)
    wait_until(lambda: retries.started("c"), timeout=20, message="the first attempt to start")
    second = retries.send(_slow("c"), lambda: False)
    assert first.result(timeout=30) is not second.result(timeout=30)
    assert retries.ran() == "[1, 1]\n"


def test_the_same_code_after_an_interrupt_is_a_new_request(app: App, wait_until: Waiter) -> None:
    retries = _Retries(app, "api-tests-retry-interrupt")
    # The marker comes after more than a second of running: an answer so late could have gone unread.
    code = "import time\nran.append(1)\ntime.sleep(1.1)\nopen('d', 'w').close()\ntime.sleep(30 if len(ran) == 1 else 0)"
    first = retries.abandoned(code, "d", wait_until)
    path = f"/tci/sessions/{retries.session_id}/interrupt"
    assert app.client.post(path, headers=auth(retries.key)).json()["data"]["interrupted"] is True
    assert first.result(timeout=30).outcome == "interrupted"
    again = retries.send(code, lambda: False).result(timeout=30)
    assert again.outcome == "ok"
    assert retries.ran() == "[1, 1]\n"


def test_a_retry_of_a_new_session_execute_whose_client_left_gets_that_session(app: App, wait_until: Waiter) -> None:
    # Without a session id: the retry would otherwise start a second session and run the code there.
    retries = _Retries(app, "api-tests-retry-fresh", fresh=True)
    code = "import time\nopen('e', 'w').close()\ntime.sleep(1.2)\nprint('done')"
    first = retries.abandoned(code, "e", wait_until)
    retry = retries.send(code, lambda: False)
    assert retry.result(timeout=30) is first.result(timeout=30)
    assert [s["id"] for s in app.sessions(retries.key)] == [first.result().session_id]


def test_a_retried_new_session_execute_is_not_answered_again_by_its_session_id(app: App, wait_until: Waiter) -> None:
    # The retry (no session id) gets the abandoned run's answer; the same code sent next with the
    # session id that answer carried is a new request and runs.
    retries = _Retries(app, "api-tests-retry-fresh-once", fresh=True)
    code = "import time\nopen('runs', 'a').write('x')\ntime.sleep(1.2)\nprint(len(open('runs').read()))"
    first = retries.abandoned(code, "runs", wait_until)
    answer = first.result(timeout=30)
    assert retries.send(code, lambda: False).result(timeout=30) is answer
    again = retries.send(code, lambda: False, answer.session_id).result(timeout=30)
    assert again is not answer
    assert again.outputs == [{"type": "stdout", "data": "2\n"}]


def test_a_stopping_server_answers_running_code_as_interrupted_and_runs_nothing_more(
    wait_until: Waiter, tmp_path: Path
) -> None:
    # Without this, the server's shutdown cut the connection of code still running after its grace,
    # and both SDKs sent that code again to the next server, where it ran a second time.
    key = "api-tests-stopping"
    markers = [tmp_path / "running", tmp_path / "cell"]
    with running_app() as app:
        session_id = app.execute(key, "x = 1")["session_id"]
        code, cell = (
            f"import pathlib, time\nprint('began')\npathlib.Path({str(marker)!r}).touch()\ntime.sleep(30)"
            for marker in markers
        )
        running: dict[str, Any] = {}
        threads = [
            threading.Thread(
                target=lambda: running.update(
                    r=app.client.post("/tci/execute", json={"code": code, "session_id": session_id}, headers=auth(key))
                )
            ),
            # A SandboxFusion reward call: its kernel is fresh each time, so a retry loses nothing.
            threading.Thread(
                target=lambda: running.update(jupyter=app.client.post("/run_jupyter", json={"cells": [cell]}))
            ),
        ]
        for thread in threads:
            thread.start()
        for marker in markers:
            wait_until(marker.exists, timeout=20, message="the code to run")
        stopping = app.client.app.stopping  # type: ignore[attr-defined]
        portal = app.client.portal
        assert portal is not None
        portal.call(stopping)
        for thread in threads:
            thread.join(timeout=30)
        assert running["jupyter"].status_code == 504, running["jupyter"].text
        assert running["jupyter"].headers["retry-after"] == "1"
        data = running["r"].json()["data"]
        assert data["outcome"] == "interrupted"
        assert stdout_of(data) == "began\n"
        assert "the server was stopped while this code ran" in data["outputs"][-1]["data"]
        assert app.client.get("/readyz").status_code == 503  # load balancers send new work elsewhere
        before = app.snapshot()
        for body in ({"code": "x = 2", "session_id": session_id}, {"code": "x = 2"}):
            refused = app.client.post("/tci/execute", json=body, headers=auth(key))
            check_error(refused, 429, "rate_limit_exceeded")
            assert "nothing ran" in refused.json()["error"]["message"]
        assert app.snapshot() == before
