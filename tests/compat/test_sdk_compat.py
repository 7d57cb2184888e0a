"""The official SDKs, unchanged, against the real server: 1.x ``run()`` and 2.x ``execute()``/``sessions.list()``.

Clients: ``v1`` (together 1.5.35), ``v2-strict`` (together 2.42.0 with
``_strict_response_validation=True``, so any shape drift fails loudly) and, for the basics, ``v2``
(the lenient default). Each case runs against ``/v1`` and the bare host as base URL.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any

import pytest
from sdk.harness import SdkRunner, Server

pytestmark = pytest.mark.compat

CLIENTS = ["v1", "v2-strict"]
BASES = {"base=v1": "/v1", "base=bare": ""}
SESSION_ID = re.compile(r"^ses_[A-Za-z0-9]{8,64}$")
OUTPUT_TYPES = {"stdout", "stderr", "error", "display_data", "execute_result"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def base_params(*names: str) -> list[Any]:
    return [pytest.param(BASES[name], id=name) for name in names or BASES]


def execute_path(client: str, base: str) -> str:
    """The request path each SDK builds (verified): 1.x always adds a second slash."""
    prefix = base.rstrip("/")
    return f"{prefix}//tci/execute" if client == "v1" else f"{prefix}/tci/execute"


def check_response(response: dict[str, Any], client: str) -> None:
    """A well-formed success as the SDK parsed it."""
    assert response["class"] == ("ExecuteResponse" if client == "v1" else "SuccessfulExecution")
    assert response["status"] == "success"
    assert SESSION_ID.match(response["session_id"]), response["session_id"]
    for output in response["outputs"]:
        assert output["type"] in OUTPUT_TYPES, output
        if output["type"] in {"display_data", "execute_result"}:
            assert isinstance(output["data"], dict), output
        else:
            assert isinstance(output["data"], str), output
    if client.startswith("v2"):
        assert response["top_errors"] is None


def check_requests(result: dict[str, Any], client: str, base: str, count: int, status: int = 200) -> None:
    """Exactly ``count`` execute requests, on the expected path, none retried."""
    requests = result["requests"]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("POST", execute_path(client, base), status)
    ] * count, requests
    if client.startswith("v2"):
        assert {r["retry_count"] for r in requests} == {"0"}


def stdout_of(response: dict[str, Any]) -> str:
    return "".join(o["data"] for o in response["outputs"] if o["type"] == "stdout")


@pytest.mark.parametrize("base", [*base_params(), pytest.param("/v1/", id="base=v1-slash")])
@pytest.mark.parametrize("client", ["v1", "v2", "v2-strict"])
def test_hello_world(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "hello", server.url + base)
    response = result["first"]
    check_response(response, client)
    assert [(o["type"], o["data"]) for o in response["outputs"]] == [("stdout", "Hello, world!\n")]
    if client == "v1":
        assert response["data_errors"] is None
    check_requests(result, client, base, 1)


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", CLIENTS)
def test_state_persists_in_session(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "state", server.url + base)
    first, second = result["first"], result["second"]
    check_response(first, client)
    check_response(second, client)
    assert first["outputs"] == []
    assert second["session_id"] == first["session_id"]
    assert [(o["type"], o["data"]) for o in second["outputs"]] == [("stdout", "42\n")]
    check_requests(result, client, base, 2)


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", CLIENTS)
def test_docs_numpy_example(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "numpy", server.url + base)
    response = result["first"]
    check_response(response, client)
    check_requests(result, client, base, 1)
    if server.backend == "docker":
        # numpy is preinstalled in the image, so `!pip install` is satisfied even without network.
        assert not [o for o in response["outputs"] if o["type"] == "error"], response["outputs"]
        out = stdout_of(response)
        assert "Eigenvalues:" in out
        assert "-0.37228132" in out
        assert "5.37228132" in out


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", CLIENTS)
def test_uploaded_script_runs(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "upload", server.url + base)
    response = result["first"]
    check_response(response, client)
    assert stdout_of(response) == "Hello from inside myscript.py!\n"
    assert not [o for o in response["outputs"] if o["type"] == "error"], response["outputs"]
    check_requests(result, client, base, 1)


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", CLIENTS)
def test_matplotlib_plot_is_display_data(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "plot", server.url + base)
    response = result["first"]
    check_response(response, client)
    displays = [o for o in response["outputs"] if o["type"] == "display_data"]
    assert len(displays) == 1, response["outputs"]
    bundle = displays[0]["data"]
    assert base64.b64decode(bundle["image/png"], validate=True).startswith(PNG_MAGIC)
    assert bundle["text/plain"].startswith("<Figure size")
    if client.startswith("v2"):
        assert displays[0]["model"] == "SuccessfulExecutionDataOutputDisplayorExecuteOutput"
    check_requests(result, client, base, 1)


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", ["v2", "v2-strict"])
def test_sessions_list_counts_executes(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "sessions", server.url + base)
    first, second = result["first"], result["second"]
    check_response(first, client)
    check_response(second, client)
    assert stdout_of(second) == "2\n"
    session_id = first["session_id"]
    # A fresh API key per test: its tenant owns exactly this one session.
    (once,) = result["listed_once"]
    (twice,) = result["listed_twice"]
    assert once["id"] == twice["id"] == session_id
    assert (once["execute_count"], twice["execute_count"]) == (1, 2)
    for item in (once, twice):
        assert item["types"] == ["datetime"]
        assert item["tz_aware"]
        started, last, expires = (
            datetime.fromisoformat(item[k]) for k in ("started_at", "last_execute_at", "expires_at")
        )
        assert started <= last < expires
    assert twice["started_at"] == once["started_at"]
    assert datetime.fromisoformat(twice["last_execute_at"]) >= datetime.fromisoformat(once["last_execute_at"])
    prefix = base.rstrip("/")
    assert [(r["method"], r["path"], r["status"]) for r in result["requests"]] == [
        ("POST", f"{prefix}/tci/execute", 200),
        ("GET", f"{prefix}/tci/sessions", 200),
        ("POST", f"{prefix}/tci/execute", 200),
        ("GET", f"{prefix}/tci/sessions", 200),
    ]


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", CLIENTS)
def test_exception_is_an_error_output(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "error", server.url + base)
    response = result["first"]
    check_response(response, client)
    errors = [o for o in response["outputs"] if o["type"] == "error"]
    assert len(errors) == 1, response["outputs"]
    assert "ZeroDivisionError" in errors[0]["data"]
    if client == "v1":
        # What 1.x users check: `if response.data.errors:`.
        assert response["data_errors"]
        assert "ZeroDivisionError" in response["data_errors"]
    check_requests(result, client, base, 1)


@pytest.mark.parametrize("base", base_params())
@pytest.mark.parametrize("client", CLIENTS)
def test_unknown_session_raises_not_found_once(sdk: SdkRunner, server: Server, client: str, base: str) -> None:
    result = sdk.run(client, "notfound", server.url + base)
    expected = "together.error.InvalidRequestError" if client == "v1" else "together.NotFoundError"
    assert result["raised"] == expected, result
    assert result["is_sdk_not_found_error"], result
    assert "session_not_found" in result["message"]
    # Exactly one request: a 404 must not be retried (that would mean running code twice elsewhere).
    check_requests(result, client, base, 1, status=404)


@pytest.mark.parametrize("client", ["v1", "v2"])
def test_an_execute_queued_past_the_clients_timeout_runs_once(sdk: SdkRunner, server: Server, client: str) -> None:
    # A 3 s client queues behind a 6 s execute of another client on the same session: it times out
    # and sends the code again. The abandoned attempt must not run when its turn comes.
    result = sdk.run(client, "queued_retry", server.url + "/v1")
    assert result["hasty"]["status"] == "success", result
    final = result["final"]["outputs"]
    assert [(o["type"], o["data"]) for o in final] == [("stdout", "[1]\n")], result
    # The attempt that ran waited for the blocker too: the SDK did time out and send it again.
    assert result["hasty_seconds"] > 3, result


def test_a_1x_retry_of_code_still_running_is_answered_with_its_result(sdk: SdkRunner, server: Server) -> None:
    # The 1.x SDK says nothing of its timeout (3 s here): the 5 s code outlives it, the SDK sends the
    # code again while it runs, and the retry must get the first attempt's answer instead of a second run.
    result = sdk.run("v1", "running_retry", server.url + "/v1")
    assert result["hasty"]["status"] == "success", result
    assert [(o["type"], o["data"]) for o in result["hasty"]["outputs"]] == [("stdout", "1\n")], result
    assert [(o["type"], o["data"]) for o in result["final"]["outputs"]] == [("stdout", "[1]\n")], result
    assert result["hasty_seconds"] > 3, result  # the SDK did time out and send it again


def test_a_1x_retry_of_a_new_session_execute_gets_that_session(sdk: SdkRunner, server: Server) -> None:
    # Without a session id each retry used to start a session of its own and run the code there.
    result = sdk.run("v1", "running_retry_new", server.url + "/v1")
    assert result["hasty"]["status"] == "success", result
    assert [(o["type"], o["data"]) for o in result["hasty"]["outputs"]] == [("stdout", "done\n")], result
    assert result["sessions"] == [result["hasty"]["session_id"]], result
    assert result["hasty_seconds"] > 3, result


@pytest.mark.parametrize("base", base_params("base=v1"))
def test_a_long_execute_ends_inside_the_2x_sdks_read_timeout(sdk: SdkRunner, server: Server, base: str) -> None:
    # The client waits 12 s (x-stainless-read-timeout: 12.0); the server keeps 5 s clear of it.
    result = sdk.run("v2-strict", "read_timeout", server.url + base)
    response = result["first"]
    check_response(response, "v2-strict")
    assert stdout_of(response) == "started\n"
    errors = [o["data"] for o in response["outputs"] if o["type"] == "error"]
    assert len(errors) == 1, response["outputs"]
    # 12 s less a margin of 5, less what starting the session took (a cold start without a pool).
    limit = float(errors[0].split("exceeded the ")[1].split(" s time limit")[0])
    assert 0 < limit <= 7, errors[0]
    # One request, answered 200: the SDK never timed out, so it never sent the code again.
    check_requests(result, "v2-strict", base, 1)
