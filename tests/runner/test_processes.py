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
