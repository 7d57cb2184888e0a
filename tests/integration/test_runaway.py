"""Runaway code in one session, on the real engine and image: stopped, reported, and the session goes on.

One server and one session serve the whole module (each case starts a container's worth of
processes, so sharing keeps the suite within its time budget); every case first stores a marker in
the kernel and then checks whether it survived, as the README's table promises.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends import labels

from .conftest import RUN_PREFIX, docker_settings, execute, remove_labelled, socket_dir, text_of

pytestmark = pytest.mark.docker

PIDS = 256
PROCESS_COUNT = "import os\nprint(sum(1 for p in os.listdir('/proc') if p.isdigit()))"


class Session:
    """One session of the module's server, re-created if a case ends it."""

    def __init__(self, api: TestClient) -> None:
        self.api = api
        self.id: str | None = None

    def run(self, code: str, **extra: Any) -> dict[str, Any]:
        data = execute(self.api, code, self.id, **extra)
        self.id = data["session_id"]
        return data

    def mark(self) -> str:
        value = secrets.token_hex(4)
        assert self.run(f"marker = {value!r}")["outcome"] == "ok"
        return value

    def kept(self, value: str) -> bool:
        return text_of(self.run("print(globals().get('marker'))"), "stdout") == f"{value}\n"

    def processes(self) -> int:
        """Processes in the container now (tini, runner, kernel when nothing is left over)."""
        return int(text_of(self.run(PROCESS_COUNT), "stdout"))


@pytest.fixture(scope="module")
def session(docker_client: docker.DockerClient) -> Iterator[Session]:
    run_id = RUN_PREFIX + secrets.token_hex(6)
    settings = docker_settings(run_id, execute_timeout_seconds=30, sandbox={"pids": PIDS})
    try:
        with TestClient(create_app(settings)) as api:
            yield Session(api)
    finally:
        remove_labelled(docker_client, f"{labels.TEST_RUN}={run_id}")
        shutil.rmtree(socket_dir(run_id), ignore_errors=True)


BOMB = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"


def test_fork_bomb_in_a_child_is_stopped_within_the_execute(session):
    marker = session.mark()
    # The case from the issue tracker: the bomb used to starve the runner until the reply timed out.
    spawn = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {BOMB!r}])\n"
    data = session.run(spawn + "time.sleep(5); print('done')")
    assert data["outcome"] == "ok", data
    assert text_of(data, "stdout") == "done\n"
    assert f"when the pids limit ({PIDS}) was reached: " in text_of(data, "stderr"), data
    assert data["state_lost"] is False
    assert session.kept(marker)
    assert session.processes() < 10


def test_fork_bomb_from_a_shell_is_stopped(session):
    marker = session.mark()
    data = session.run("!bash -c ':(){ :|:& };:'\nprint('after')")
    assert data["outcome"] == "ok", data
    assert text_of(data, "stdout") == "after\n"
    assert "stopped" in text_of(data, "stderr"), data
    assert session.kept(marker)
    assert session.processes() < 10


def test_fork_bomb_of_the_interpreter_itself_restarts_it(session):
    session.mark()
    data = session.run(BOMB)
    assert data["outcome"] == "kernel_died", data
    assert data["state_lost"] is True
    assert "forked itself over and over" in text_of(data, "error"), data
    assert "forks of the kernel" in text_of(data, "stderr"), data
    assert session.processes() < 10
    assert session.run("print('alive')")["outputs"] == [{"type": "stdout", "data": "alive\n"}]


def test_bounded_forks_of_the_interpreter_keep_the_session(session):
    marker = session.mark()
    data = session.run(
        "import os\nstarted = 0\n"
        "for _ in range(2000):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        os.execv('/bin/sleep', ['sleep', '300'])\n"
        "    started += 1\n"
        "print(started)"
    )
    assert data["outcome"] == "ok", data
    assert "sleep" in text_of(data, "stderr"), data
    assert session.kept(marker)
    assert session.processes() < 10


def test_background_hogs_and_daemons_are_stopped_when_the_execute_ends(session):
    marker = session.mark()
    data = session.run(
        "import subprocess\n"
        "!for i in 1 2 3 4 5 6 7 8; do (yes > /dev/null &); done\n"
        "!python -m http.server 8765 > /dev/null 2>&1 &\n"
        # SIGTERM ignored, a new session, a double fork: each still a descendant of the runner.
        "subprocess.Popen(['bash', '-c', \"trap '' TERM; setsid bash -c '(sleep 1000 &); touch /tmp/up; sleep 1000' &"
        ' sleep 1000"])\n'
        "import os, time\ndeadline = time.monotonic() + 10\n"
        "while not os.path.exists('/tmp/up') and time.monotonic() < deadline:\n    time.sleep(0.05)\n"
        "print('started')",
        timeout=20,
    )
    assert data["outcome"] == "ok", data
    assert text_of(data, "stdout") == "started\n"
    stderr = text_of(data, "stderr")
    assert "still running when the execute ended: 8 yes" in stderr, data
    assert "python" in stderr, data
    assert "sleep" in stderr, data
    assert session.kept(marker)
    assert session.processes() < 10


def test_interrupting_a_shell_escape_with_background_processes_keeps_the_session(session):
    marker = session.mark()
    data = session.run("!for i in 1 2 3 4; do (yes > /dev/null &); done; trap '' INT; sleep 100", timeout=2)
    assert data["outcome"] == "timeout", data
    assert data["state_lost"] is False
    assert session.kept(marker)
    assert session.processes() < 10


def test_thousands_of_threads_restart_the_interpreter(session):
    session.mark()
    data = session.run(
        "import threading, time\nthreads = []\n"
        "try:\n    for _ in range(5000):\n"
        "        t = threading.Thread(target=time.sleep, args=(600,)); t.start(); threads.append(t)\n"
        "except RuntimeError as e:\n    print('refused', e)"
    )
    assert data["outcome"] == "kernel_died", data
    assert data["state_lost"] is True
    assert "refused" in text_of(data, "stdout")
    assert "threads" in text_of(data, "error"), data
    assert session.run("print('alive')")["outputs"] == [{"type": "stdout", "data": "alive\n"}]


def test_open_file_exhaustion(session):
    marker = session.mark()
    child = session.run("!python -c \"fs = [open('/dev/null') for _ in range(5000)]\" 2>&1 | tail -1")
    assert "Too many open files" in text_of(child, "stdout"), child
    assert session.kept(marker)
    data = session.run(
        "files = []\ntry:\n    while True: files.append(open('/dev/null'))\nexcept OSError as e:\n    print(e)"
    )
    assert data["outcome"] == "kernel_died", data
    assert "Too many open files" in text_of(data, "stdout"), data
    assert "open files" in text_of(data, "error"), data
    assert data["state_lost"] is True
    assert text_of(session.run("!echo shell works"), "stdout") == "shell works\n"


def test_zombie_piles_are_collected(session):
    marker = session.mark()
    child = session.run(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import os, time\\n"
        "for _ in range(1000):\\n    try:\\n        os.fork() or os._exit(0)\\n    except OSError:\\n        break\\n"
        "time.sleep(600)'])\n"
        "time.sleep(3)"
    )
    assert child["outcome"] == "ok", child
    # The parent of the pile, and any fork caught between fork and exit.
    assert f"when the pids limit ({PIDS}) was reached: " in text_of(child, "stderr"), child
    own = session.run(
        "import os\nn = 0\ntry:\n    for _ in range(1000):\n        os.fork() or os._exit(0)\n        n += 1\n"
        "except OSError as e:\n    print('refused', e.errno)"
    )
    assert own["outcome"] == "ok", own
    assert "refused 11" in text_of(own, "stdout"), own
    assert session.kept(marker)
    assert session.processes() < 10  # the kernel collects its zombies before the next cell


@pytest.mark.parametrize("directory", ["/tmp", "/workspace", "/dev/shm", "/home/sandbox"])
def test_filled_disks_leave_the_session_working(session, directory):
    marker = session.mark()
    fill = session.run(
        f"import errno, os\npath = os.path.join({directory!r}, 'fill')\n"
        "with open(path, 'wb', buffering=0) as f:\n    try:\n        while True: f.write(b'x' * (1 << 20))\n"
        "    except OSError as e:\n        print(errno.errorcode[e.errno])\n"
        f"print(os.statvfs({directory!r}).f_bavail)"
    )
    assert text_of(fill, "stdout").split() == ["ENOSPC", "0"], fill
    assert session.kept(marker)
    crash = session.run("import os; os._exit(3)")
    assert crash["outcome"] == "kernel_died", crash
    assert crash["state_lost"] is True
    assert "did not start" not in text_of(crash, "error"), crash
    freed = session.run(
        f"import os\nos.remove(os.path.join({directory!r}, 'fill'))\nprint(os.statvfs({directory!r}).f_bavail > 0)"
    )
    assert text_of(freed, "stdout") == "True\n", freed
