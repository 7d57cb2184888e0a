"""The runner's held descriptors: what it reads after every execute stays current and never leaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sandbox_runner import procs


def _own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_held_reads_see_every_change(tmp_path: Path) -> None:
    held = procs._Held()
    counter, directory = tmp_path / "counter", tmp_path / "dir"
    counter.write_text("1\n")
    directory.mkdir()
    assert held.read(str(counter)) == "1\n"
    assert held.listdir(str(directory)) == []
    with counter.open("r+") as handle:  # the same inode, as a cgroup file is
        handle.write("22\n")
    (directory / "a").touch()
    assert held.read(str(counter)) == "22\n"
    assert held.listdir(str(directory)) == ["a"]
    (directory / "a").unlink()
    assert held.listdir(str(directory)) == []


def test_open_files_follows_the_process_and_forgets_one_that_is_gone() -> None:
    # The child says when it has started: an interpreter still starting opens and closes files.
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        before = procs.open_files(child.pid)
        assert before >= 3
        assert procs.open_files(os.getpid()) > 0  # another pid replaces the held directory
        fds = _own_fds()
        assert procs.open_files(child.pid) == before
        assert _own_fds() == fds  # one directory held at a time
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    fds = _own_fds()
    assert procs.open_files(child.pid) == 0
    assert _own_fds() <= fds  # the dead process's directory was let go


def test_only_sees_a_new_process_at_once() -> None:
    me = {os.getpid()}
    # Other processes may run where the tests do, so compare a listing with and without a child.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert not procs.only(me | {int(n) for n in os.listdir("/proc") if n.isdigit()} - {child.pid})
        # A process of someone else's may start between the two listings: a few tries settle it.
        assert any(procs.only(me | {int(n) for n in os.listdir("/proc") if n.isdigit()}) for _ in range(20))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
