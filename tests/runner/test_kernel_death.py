"""A kernel that dies (signal, exit, memory) is explained, restarted, and the session goes on.

Every test kills a kernel, so each gets a runner of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


async def assert_fresh_kernel(runner, old_pid: int) -> None:
    """The kernel was replaced, the old state is gone, and the new kernel works."""
    stats = await runner.stats()
    assert stats["kernel_pid"] not in (None, old_pid)
    assert stats["kernel_restarts"] == 1
    assert stats["kernel_ready"] is True
    after = await runner.execute("print('doomed' in globals(), 6 * 7)")
    assert after.outcome == "ok"
    assert after.outputs == [{"type": "stdout", "data": "False 42\n"}]


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        pytest.param(
            "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "killed by signal 11 (SIGSEGV)", id="sigsegv"
        ),
        pytest.param(
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by signal 9 (SIGKILL)", id="sigkill"
        ),
        pytest.param("import os\nos._exit(3)", "exited with status 3", id="exit-3"),
    ],
)
async def test_kernel_death(fresh_runner, code, cause):
    runner = fresh_runner
    assert (await runner.execute("doomed = 1")).outcome == "ok"
    pid = (await runner.stats())["kernel_pid"]
    result = await runner.execute(code)
    assert result.outcome == "kernel_died"
    assert result.result["state_lost"] is True
    (error,) = result.of("error")
    assert cause in error
    assert "state are lost" in error
    assert result.result["error_summary"].startswith("KernelDied:")
    assert not runner.pid_alive(pid)
    await assert_fresh_kernel(runner, pid)


def exited(pid: int, runner) -> bool:
    """Whether ``pid`` is gone or a zombie whose threads have all exited, so that its parent can reap it."""
    task_dir = Path(f"/proc/{pid}/task")
    try:
        return not runner.pid_alive(pid) and os.listdir(task_dir) == [str(pid)]
    except FileNotFoundError:
        return True


async def test_kernel_death_between_executes(fresh_runner):
    runner = fresh_runner
    result = await runner.execute(
        "import os, signal, threading\ndoomed = 1\nthreading.Timer(0.2, os.kill, (os.getpid(), signal.SIGKILL)).start()"
    )
    assert result.outcome == "ok"
    before = await runner.stats()
    pid = before["kernel_pid"]
    await runner.wait_until(lambda: exited(pid, runner), 10, "the kernel has killed itself")
    lost = await runner.execute("open('should-not-exist', 'w').close()")
    assert lost.outcome == "not_run", lost.result
    assert lost.result["state_lost"] is True
    (error,) = lost.of("error")
    assert "signal 9 (SIGKILL)" in error
    assert "not run" in error
    assert not (runner.workdir / "should-not-exist").exists()
    assert (await runner.stats())["execute_count"] == before["execute_count"], "code that did not run is not counted"
    await assert_fresh_kernel(runner, pid)


async def test_memory_bomb_in_the_kernel(start_runner):
    async with start_runner(TCI_RUNNER_KERNEL_MEMORY_BYTES=str(300 * MiB)) as runner:
        assert (await runner.execute("doomed = 1")).outcome == "ok"
        pid = (await runner.stats())["kernel_pid"]
        # Paced, so that a slow watchdog poll on a loaded machine does not let it take gigabytes.
        bomb = "import time\nhog = []\nwhile True:\n    hog.append(b'x' * (16 << 20))\n    time.sleep(0.005)"
        result = await runner.execute(bomb, timeout=60)
        assert result.outcome == "oom"
        assert result.result["state_lost"] is True
        (error,) = result.of("error")
        assert "out of memory" in error
        assert "limit 300 MiB" in error
        await assert_fresh_kernel(runner, pid)


async def test_memory_bomb_in_a_child_process(start_runner):
    bomb = (
        "import os, time\nprint(os.getpid(), flush=True)\nhog = []\n"
        "while True:\n    hog.append(b'x' * (8 << 20))\n    time.sleep(0.005)\n"
    )
    async with start_runner(TCI_RUNNER_KERNEL_MEMORY_BYTES=str(300 * MiB)) as runner:
        assert (await runner.execute("doomed = 1")).outcome == "ok"
        pid = (await runner.stats())["kernel_pid"]
        result = await runner.execute("!python bomb.py", files=[{"name": "bomb.py", "content": bomb}], timeout=60)
        assert result.outcome == "oom", "a child's memory counts against the kernel"
        assert "out of memory" in result.text("error")
        bomb_pid = int(result.text("stdout").split()[0])
        # Killed with the old kernel, before the new one started, not only by the sweep after the reply.
        assert not runner.pid_alive(bomb_pid)
        await assert_fresh_kernel(runner, pid)


# The interpreter's socket to the runner is the lowest free descriptor it inherited; user code can find it.
_FIND_SOCKET = """
import os, socket, stat
sock_fd = next(
    fd for fd in range(3, 64)
    if os.path.exists(f"/proc/self/fd/{fd}") and stat.S_ISSOCK(os.fstat(fd).st_mode)
)
"""


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        pytest.param("os.write(sock_fd, b'\\x7f\\xff\\xff\\xffnot a frame')", "unreadable message", id="garbage"),
        pytest.param("os.write(sock_fd, b'\\x00\\x00\\x00\\x03abc')", "unreadable message", id="not-json"),
        pytest.param("os.write(sock_fd, b'\\x80\\x00\\x00\\x02\\x09x')", "unreadable message", id="no-such-stream"),
        pytest.param("socket.socket(fileno=sock_fd).shutdown(socket.SHUT_RDWR)", "connection", id="shutdown"),
    ],
)
async def test_user_code_that_breaks_the_interpreters_socket_costs_only_its_state(fresh_runner, code, cause):
    runner = fresh_runner
    assert (await runner.execute("doomed = 1")).outcome == "ok"
    pid = (await runner.stats())["kernel_pid"]
    result = await runner.execute(_FIND_SOCKET + code + "\nimport time\ntime.sleep(5)")
    assert result.outcome == "kernel_died"
    assert result.result["state_lost"] is True
    (error,) = result.of("error")
    assert cause in error
    await assert_fresh_kernel(runner, pid)


async def test_a_forged_done_frame_is_ignored(fresh_runner):
    runner = fresh_runner
    code = _FIND_SOCKET + (
        "import json, struct\n"
        "done = {'type': 'done', 'cell': 999, 'execution_count': 1, 'dropped': {}, 'exit': False}\n"
        "body = json.dumps(done).encode()\n"
        "os.write(sock_fd, struct.pack('>I', len(body)) + body)\n"
        "print('still running')"
    )
    result = await runner.execute(code)
    assert result.outcome == "ok"
    assert result.text("stdout") == "still running\n"
    assert result.result["state_lost"] is False


async def test_exit_restarts_the_interpreter_and_says_so(fresh_runner):
    runner = fresh_runner
    assert (await runner.execute("doomed = 1")).outcome == "ok"
    pid = (await runner.stats())["kernel_pid"]
    result = await runner.execute("print('bye')\nexit()")
    assert result.outcome == "ok"
    assert result.text("stdout") == "bye\n"
    assert result.result["state_lost"] is True
    await assert_fresh_kernel(runner, pid)


async def test_closed_standard_descriptors_come_back_at_the_next_execute(fresh_runner):
    runner = fresh_runner
    closed = await runner.execute("import os\nkept = 1\nos.close(1)\nos.close(2)")
    assert closed.outcome == "ok"
    after = await runner.execute("import subprocess\nprint(kept)\nsubprocess.run(['echo', 'child'])")
    assert after.outcome == "ok"
    assert after.text("stdout") == "1\nchild\n"


async def test_a_forked_child_never_writes_on_the_interpreters_socket(fresh_runner):
    runner = fresh_runner
    code = (
        "import os\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('child', flush=True)\n"
        "    display({'image/png': 'x' * 100000}, raw=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('parent')"
    )
    result = await runner.execute(code)
    assert result.outcome == "ok", result.outputs
    assert result.result["state_lost"] is False
    assert result.text("stdout") == "child\nparent\n"
    assert (await runner.execute("print(6 * 7)")).text("stdout") == "42\n"


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_a_cell_that_sets_a_standard_stream_to_none_costs_nothing_later(fresh_runner, stream):
    # IPython writes through sys.stdout and sys.stderr around every cell: None there used to fail the
    # next cell inside IPython, which ended the interpreter and its state.
    runner = fresh_runner
    set_none = await runner.execute(f"import sys\nkept = 42\nsys.{stream} = None\nprint('gone')")
    assert set_none.outcome == "ok"
    after = await runner.execute("print('after', kept)")
    assert after.outcome == "ok"
    assert after.result["state_lost"] is False
    assert after.text("stdout") == "after 42\n"
    assert (await runner.stats())["kernel_restarts"] == 0


async def test_an_error_ipython_cannot_format_is_still_the_cells_error(fresh_runner):
    # With a recursion limit this low IPython's traceback formatter fails and prints a fallback to
    # stderr instead of sending the error: the cell still failed.
    runner = fresh_runner
    assert (await runner.execute("import sys\nkept = 42\nsys.setrecursionlimit(30)")).outcome == "ok"
    result = await runner.execute("raise ValueError('deep')")
    assert result.outcome == "error", result.outputs
    errors = [o for o in result.outputs if o["type"] == "error"]
    assert len(errors) == 1, result.outputs
    assert "ValueError" in errors[0]["data"]
    assert "deep" in errors[0]["data"]
    restored = await runner.execute("sys.setrecursionlimit(3000)\nprint(kept)")
    assert restored.text("stdout") == "42\n"


@pytest.mark.parametrize("code", ["%nosuchmagic", "%%nosuchcell\nx"])
async def test_a_usage_error_is_one_line_on_stderr_as_in_jupyter(fresh_runner, code):
    result = await fresh_runner.execute(code)
    assert result.of("error") == [], result.outputs
    assert "UsageError" in result.text("stderr")


async def test_a_callback_that_exits_fails_its_cell_not_the_interpreter(fresh_runner):
    runner = fresh_runner
    register = (
        "import sys\nkept = 42\n"
        "def leave(result):\n    sys.exit(3)\n"
        "get_ipython().events.register('post_run_cell', leave)"
    )
    result = await runner.execute(register)
    assert [data.splitlines()[-1] for data in result.of("error")] == ["SystemExit: 3"], result.outputs
    after = await runner.execute("get_ipython().events.unregister('post_run_cell', leave)\nprint(kept)")
    assert after.text("stdout") == "42\n"
    assert (await runner.stats())["kernel_restarts"] == 0
