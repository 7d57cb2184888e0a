"""Leftover-process policy: after every execute, every descendant of the runner except the kernel is killed."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.anyio

SPAWN = """
import os, shutil, subprocess
sleep = shutil.which('sleep')
sleeper = subprocess.Popen([sleep, '300'])
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    # A classic daemon: new session, fork again, the middle process exits, the grandchild is orphaned.
    os.setsid()
    if os.fork() == 0:
        os.write(write_end, str(os.getpid()).encode())
        os.execv(sleep, [sleep, '301'])
    os._exit(0)
os.close(write_end)
os.waitpid(child, 0)
daemon = int(os.read(read_end, 32))
os.close(read_end)
survivor = 'intact'
print(sleeper.pid, daemon)
"""


async def test_leftover_processes_are_killed_after_the_execute(runner):
    before = await runner.stats()
    result = await runner.execute(SPAWN)
    assert result.outcome == "ok", result.outputs
    pids = [int(pid) for pid in result.text("stdout").split()]
    assert len(pids) == 2
    background = await runner.execute("!sleep 302 > /dev/null 2>&1 & echo $!")
    assert background.outcome == "ok", background.outputs
    pids.append(int(background.text("stdout")))
    await runner.wait_until(
        lambda: not any(runner.pid_alive(pid) for pid in pids), 10, f"the leftovers {pids} are killed"
    )
    after = await runner.stats()
    assert after["kernel_pid"] == before["kernel_pid"], "the kernel itself is kept"
    assert after["kernel_restarts"] == before["kernel_restarts"]
    state = await runner.execute("print(survivor, sleeper.wait())")
    assert state.outputs == [{"type": "stdout", "data": "intact -9\n"}]


async def test_the_kernel_survives_its_own_sweep(runner):
    pid = (await runner.stats())["kernel_pid"]
    for _ in range(3):
        assert (await runner.execute("import subprocess\nsubprocess.Popen(['true'])")).outcome == "ok"
    assert runner.pid_alive(pid)
    assert (await runner.stats())["kernel_pid"] == pid


async def test_shell_escape_returns_when_the_shell_exits(runner):
    """Background processes keep the command's pipes open; the cell still ends with the shell."""
    await runner.execute("kept = 'yes'")
    result = await runner.execute(
        "!for i in 1 2 3 4 5 6 7 8; do (yes > /dev/null &); done\n"
        "!(sleep 0.2; echo late from the background) &\n"
        "!sleep 60 &\n"
        "import time; time.sleep(1)\n"
        "print('started')",
        timeout=15,
    )
    assert result.outcome == "ok", result.outputs
    assert "started\n" in result.text("stdout")
    assert "late from the background" in result.text("stdout")
    assert "[stopped 9 processes still running when the execute ended: 8 yes, sleep]" in result.text("stderr")
    state = await runner.execute("print(kept)")
    assert state.outputs == [{"type": "stdout", "data": "yes\n"}]


async def test_interrupting_a_shell_escape_keeps_the_session(runner):
    await runner.execute("kept = 'yes'")
    for command in (
        "!sleep 100",
        "!trap '' INT; sleep 100",
        "!for i in 1 2 3 4; do (yes > /dev/null &); done; sleep 100",
    ):
        result = await runner.execute(command, timeout=1)
        assert result.outcome == "timeout", (command, result.outputs)
        assert "Session state is kept" in result.text("error"), (command, result.outputs)
    state = await runner.execute("print(kept)")
    assert state.outputs == [{"type": "stdout", "data": "yes\n"}]


async def test_processes_the_kernel_starts_run_below_it(runner):
    result = await runner.execute(
        "import os, subprocess\n"
        "child = subprocess.Popen(['sleep', '30'])\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), os.getpriority(os.PRIO_PROCESS, child.pid))\n"
        "!nice"
    )
    assert result.outcome == "ok", result.outputs
    assert result.text("stdout").split() == ["10", "19", "19"]
