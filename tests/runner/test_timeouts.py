"""Per-execute time limits and the ``interrupt`` op."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.anyio


async def test_timeout_keeps_partial_output_and_state(runner):
    assert (await runner.execute("kept_before = 'yes'")).outcome == "ok"
    pid = (await runner.stats())["kernel_pid"]
    result = await runner.execute("print('started', flush=True)\nkept_inside = 7\nwhile True:\n    pass", timeout=1)
    assert result.outcome == "timeout"
    assert result.result["state_lost"] is False
    assert result.of("stdout") == ["started\n"]
    (error,) = result.of("error")
    assert "1 s time limit" in error
    assert "KeyboardInterrupt" not in error, "the interrupt we caused is replaced by the timeout error"
    assert result.result["error_summary"].startswith("TimeoutError")
    assert 1000 <= result.result["duration_ms"] < 10_000
    after = await runner.execute("print(kept_before, kept_inside)")
    assert after.outputs == [{"type": "stdout", "data": "yes 7\n"}]
    assert (await runner.stats())["kernel_pid"] == pid


async def test_timeout_interrupts_a_shell_escape(runner):
    result = await runner.execute("!echo begun; sleep 30", timeout=1)
    assert result.outcome == "timeout"
    assert result.result["state_lost"] is False
    assert result.text("stdout") == "begun\n"
    assert result.result["duration_ms"] < 10_000
    assert (await runner.execute("print('alive')")).outputs == [{"type": "stdout", "data": "alive\n"}]


async def test_interrupt_op_stops_a_running_execute(runner):
    flag = runner.workdir / "interrupt-started"
    execute = asyncio.ensure_future(
        runner.execute("import time\nsurvivor = 1\nopen('interrupt-started', 'w').close()\ntime.sleep(60)", timeout=120)
    )
    await runner.wait_until(flag.exists, 20, "the execute is running")
    assert await runner.client.request("interrupt", {}, timeout=10) == {"interrupted": True}
    result = await asyncio.wait_for(execute, 20)
    assert result.outcome == "interrupted"
    assert result.result["error_summary"] == "KeyboardInterrupt"
    assert "KeyboardInterrupt" in result.text("error")
    assert result.result["state_lost"] is False
    assert result.result["duration_ms"] < 30_000
    assert (await runner.execute("print(survivor)")).outputs == [{"type": "stdout", "data": "1\n"}]


async def test_an_interrupt_sent_with_the_execute_is_not_lost(runner):
    """Sent before the cell had started, the interrupt was ignored and the cell ran its full course."""
    assert (await runner.execute("kept = 1")).outcome == "ok"
    # A long cell takes the interpreter a while to read: the interrupt surely arrives first.
    execute = asyncio.ensure_future(runner.execute("import time\ntime.sleep(60)\n" + "#" * 4_000_000, timeout=120))
    await asyncio.sleep(0)  # the execute request goes out first
    assert await runner.client.request("interrupt", {}, timeout=10) == {"interrupted": True}
    result = await asyncio.wait_for(execute, 20)
    assert result.outcome == "interrupted", result.outputs
    assert (await runner.execute("print(kept)")).outputs == [{"type": "stdout", "data": "1\n"}]


async def test_interrupt_when_idle_is_harmless(runner):
    assert await runner.client.request("interrupt", {}, timeout=10) == {"interrupted": False}
    assert (await runner.execute("print('still fine')")).outcome == "ok"


async def test_executes_are_serialised(runner):
    # Both requests go out in order; the second must wait for the first instead of interleaving.
    slow, fast = await asyncio.gather(
        runner.execute("import time\ntime.sleep(0.3)\norder = ['slow']"),
        runner.execute("order.append('fast')\nprint(order)"),
    )
    assert slow.outcome == "ok"
    assert fast.outputs == [{"type": "stdout", "data": "['slow', 'fast']\n"}]


async def test_kernel_ignoring_sigint_is_restarted(start_runner):
    async with start_runner(TCI_RUNNER_INTERRUPT_GRACE="0.5") as runner:
        assert (await runner.execute("lost = True")).outcome == "ok"
        pid = (await runner.stats())["kernel_pid"]
        result = await runner.execute(
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('stubborn', flush=True)\n"
            "while True:\n    pass",
            timeout=1,
        )
        assert result.outcome == "timeout"
        assert result.result["state_lost"] is True
        assert result.of("stdout") == ["stubborn\n"]
        (error,) = result.of("error")
        assert "1 s time limit" in error
        assert "did not stop" in error
        assert "state are lost" in error
        stats = await runner.stats()
        assert stats["kernel_pid"] != pid
        assert stats["kernel_restarts"] == 1
        assert not runner.pid_alive(pid)
        after = await runner.execute("print('lost' in globals())")
        assert after.outcome == "ok"
        assert after.outputs == [{"type": "stdout", "data": "False\n"}]


async def test_a_time_limit_shorter_than_the_trip_still_keeps_the_state(runner):
    """The interrupt reached the interpreter before the cell had started and was ignored: the cell ran
    on until the grace ended, and the kernel was killed with the session's state."""
    assert (await runner.execute("kept = 'yes'")).outcome == "ok"
    for _ in range(3):
        # A long cell takes the interpreter a while to read: the interrupt surely comes first.
        result = await runner.execute("import time\ntime.sleep(30)\n" + "#" * 4_000_000, timeout=1e-9)
        assert result.outcome == "timeout", result.outputs
        assert result.result["state_lost"] is False, result.outputs
    assert (await runner.execute("print(kept)")).outputs == [{"type": "stdout", "data": "yes\n"}]


async def test_a_timed_out_cell_handles_its_one_interrupt_in_peace(runner):
    """One SIGINT per time-out: a cell that saves its work on KeyboardInterrupt gets to finish saving."""
    code = "import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    time.sleep(1.2)\n    print('saved')\n"
    result = await runner.execute(code, timeout=0.5)
    assert result.outcome == "timeout", result.outputs
    assert result.result["state_lost"] is False
    assert result.text("stdout") == "saved\n"
