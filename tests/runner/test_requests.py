"""Requests the runner refuses: unknown ops and bad arguments get ``ok: false``, and nothing runs."""

from __future__ import annotations

import pytest

from orchestrator.runner_client import RunnerRefused

pytestmark = pytest.mark.anyio


async def test_unknown_op(runner):
    with pytest.raises(RunnerRefused) as caught:
        await runner.client.request("format_disk", {}, timeout=10)
    assert caught.value.code == "bad_request"
    assert "format_disk" in caught.value.message


@pytest.mark.parametrize(
    ("args", "param"),
    [
        pytest.param({}, "code", id="no-code"),
        pytest.param({"code": ["print(1)"]}, "code", id="code-not-a-string"),
        pytest.param({"code": "print(1)", "timeout": 0}, "timeout", id="zero-timeout"),
        pytest.param({"code": "print(1)", "timeout": -5}, "timeout", id="negative-timeout"),
        pytest.param({"code": "print(1)", "timeout": "10"}, "timeout", id="string-timeout"),
        pytest.param({"code": "print(1)", "timeout": True}, "timeout", id="bool-timeout"),
        pytest.param({"code": "print(1)", "timeout": 1e12}, "timeout", id="absurd-timeout"),
    ],
)
async def test_bad_execute_args(runner, args, param):
    before = (await runner.stats())["execute_count"]
    with pytest.raises(RunnerRefused) as caught:
        await runner.client.request("execute", args, timeout=10)
    assert (caught.value.code, caught.value.param) == ("bad_request", param)
    assert (await runner.stats())["execute_count"] == before


async def test_args_must_be_an_object(runner):
    with pytest.raises(RunnerRefused) as caught:
        await runner.client.request("stats", ["not", "an", "object"], timeout=10)
    assert caught.value.code == "bad_request"


@pytest.mark.parametrize("timeout", ["soon", -1, None, [1]], ids=["string", "negative", "null", "list"])
async def test_bad_ready_timeout(runner, timeout):
    with pytest.raises(RunnerRefused) as caught:
        await runner.client.request("ready", {"timeout": timeout}, timeout=10)
    assert (caught.value.code, caught.value.param) == ("bad_request", "timeout")


async def test_ready_reports_the_kernel(runner):
    result = await runner.client.request("ready", {"timeout": 5}, timeout=10)
    assert result["kernel_ready"] is True
    assert runner.pid_alive(result["kernel_pid"])
    assert result["kernel_startup_seconds"] > 0


async def test_the_runner_still_works_after_refusals(runner):
    result = await runner.execute("print('ok')")
    assert result.outputs == [{"type": "stdout", "data": "ok\n"}]
