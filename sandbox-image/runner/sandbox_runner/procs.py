"""Process and cgroup facts the runner acts on, read from /proc and /sys/fs/cgroup.

Leftover-process policy: the runner is a child subreaper, so every process started during an
execute, daemonised or not, stays its descendant. After each execute every descendant except the
kernel itself is sent SIGKILL and reaped. Background processes therefore never outlive the execute
that started them (documented in PROTOCOL.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PAGE = os.sysconf("SC_PAGE_SIZE")
_CGROUP = Path("/sys/fs/cgroup")
# A bound on SIGSTOP sweeps; a bomb is caught in a few (each freezes every process it found).
_FREEZE_ROUNDS = 100
# How ``stop_leftovers`` names the forks of the process it holds.
FORK_OF_HOLD = "forks of the kernel"


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make orphans of our descendants reparent to us instead of to PID 1."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def make_undumpable() -> bool:
    """Hide our /proc entries (fds, memory, environ) from same-uid user code."""
    return _prctl(_PR_SET_DUMPABLE, 0)


@dataclass(frozen=True)
class Proc:
    """One line of the process table."""

    ppid: int
    pgrp: int
    state: str
    name: str

    @property
    def live(self) -> bool:
        """Not a zombie (a zombie holds a pid until its parent collects it, but runs nothing)."""
        return self.state not in {"Z", "X", "x"}


def _read(path: str | Path) -> str:
    """A small file's text (``open`` directly: pathlib's own overhead is most of a /proc read)."""
    with open(path) as handle:
        return handle.read()


class _Held:
    """Files and directories read after every execute, opened once and re-read in place.

    Opening a path costs 50-90 µs in a container whose root is a userspace filesystem (each lookup
    from ``/`` is revalidated by its daemon), re-reading an open descriptor 2-10 µs. cgroup and
    /proc files and directories give their current contents to every read from the start.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        # os.listdir(fd) rewinds a duplicate, which shares the directory's offset with ours.
        self._lock = threading.Lock()

    def read(self, path: str) -> str:
        with self._lock:
            return os.pread(self._fd(path, os.O_RDONLY), 65536, 0).decode()

    def listdir(self, path: str) -> list[str]:
        with self._lock:
            return os.listdir(self._fd(path, os.O_RDONLY | os.O_DIRECTORY))

    def forget(self, path: str) -> None:
        """Close ``path`` (a process that has gone: its /proc directory never comes back)."""
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def _fd(self, path: str, flags: int) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, flags | os.O_CLOEXEC)
        return fd


_held = _Held()


def only(known: set[int]) -> bool:
    """Whether this pid namespace shows no process but ``known`` (one directory read, no file opened).

    In a container the namespace holds the init, the runner and the kernel, so "nothing else runs"
    costs one listing instead of a full ``process_table``.
    """
    return all(not name.isdigit() or int(name) in known for name in _held.listdir("/proc"))


def process_table() -> dict[int, Proc]:
    """Every process this pid namespace shows in /proc."""
    table: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = _read(f"{entry.path}/stat")
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        name = stat[stat.find("(") + 1 : stat.rfind(")")]
        table[int(entry.name)] = Proc(int(fields[1]), int(fields[2]), fields[0], name)
    return table


def descendants(root: int, table: dict[int, Proc] | None = None) -> list[int]:
    """All descendants of ``root`` (from ``table``, or a fresh scan of /proc), zombies included."""
    children: dict[int, list[int]] = {}
    for pid, proc in (process_table() if table is None else table).items():
        children.setdefault(proc.ppid, []).append(pid)
    found: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def stop_leftovers(keep: set[int], hold: int | None = None) -> Counter[str]:
    """Freeze, then SIGKILL, every descendant of this process except ``keep``; names of the live ones stopped.

    Killing a fork bomb one pid at a time lets it refill every pid freed, so everything is frozen
    first: SIGSTOP to each descendant not yet stopped, scan again, until a scan shows nothing new and
    every one of them stopped; only then SIGKILL, which a stopped process cannot answer by forking.
    ``hold`` (the kernel, which is kept) is frozen for the sweep too, so that it cannot start new
    processes meanwhile, and resumed at the end; processes still running its very program (forks
    that never called exec) are counted under ``FORK_OF_HOLD``. The dead become zombies of their
    parents; the ones adopted by this process are collected by ``reap_adopted``.

    A command line is only read from a stopped process: reading one takes the lock of its memory
    map, which a process busy forking holds most of the time (seconds of waiting under a bomb).
    """
    me = os.getpid()
    stopped: dict[int, Proc] = {}
    names: Counter[str] = Counter()
    settled = False
    # A whole process group stops in one call, members forked meanwhile included; the kernel's
    # group holds everything it starts but shell escapes (a group each).
    groups = {os.getpgrp(), *keep} - {hold}
    if hold is not None:
        _signal(hold, signal.SIGSTOP)
        _stop_group(hold, groups)
    try:
        for _ in range(_FREEZE_ROUNDS):
            table = process_table()
            new = [pid for pid in descendants(me, table) if pid not in keep and pid not in stopped]
            for pid in new:
                _stop_group(table[pid].pgrp, groups)
                _signal(pid, signal.SIGSTOP)
                stopped[pid] = table[pid]
            # SIGSTOP lands asynchronously: one still running when it was sent may fork once more.
            frozen = {*stopped, *([hold] if hold is not None else [])}
            settled = all(not proc.live or proc.state == "T" for pid, proc in table.items() if pid in frozen)
            if not new and settled:
                break
        held = _cmdline(hold) if hold is not None and settled else None
        for pid, proc in stopped.items():
            if proc.live:
                names[FORK_OF_HOLD if held and _cmdline(pid) == held else proc.name] += 1
            _signal(pid, signal.SIGKILL)
    finally:
        if hold is not None:
            _signal(hold, signal.SIGCONT)
    return names


def _stop_group(pgrp: int, done: set[int]) -> None:
    if pgrp not in done and pgrp > 1:
        done.add(pgrp)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgrp, signal.SIGSTOP)


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() or None
    except OSError:
        return None


def reap_adopted(keep: set[int]) -> int:
    """Collect our dead children except ``keep``; how many descendants besides ``keep`` are left."""
    me = os.getpid()
    table = process_table()
    for pid, proc in table.items():
        if proc.ppid == me and pid not in keep and not proc.live:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    return sum(1 for pid in descendants(me, table) if pid not in keep and table[pid].live)


def kill_leftovers(keep: set[int]) -> Counter[str]:
    """``stop_leftovers`` then one ``reap_adopted``: the kernel's own children are leftovers too."""
    stopped = stop_leftovers(keep)
    reap_adopted(keep)
    return stopped


@functools.cache
def _pids_files() -> tuple[str, str] | None:
    """The pids controller's current and max files (cgroup v2 or v1); looked up once, read every poll."""
    base = next((base for base in (_CGROUP, _CGROUP / "pids") if (base / "pids.current").exists()), None)
    return None if base is None else (str(base / "pids.current"), str(base / "pids.max"))


def pids_in_use() -> tuple[int, int] | None:
    """(tasks, limit) of the container's pids cgroup; None without a limit."""
    files = _pids_files()
    if files is None:
        return None
    current, limit = _read_int(files[0]), _read_int(files[1])
    return None if current is None or limit is None else (current, limit)


_open_files_dir: str | None = None


def open_files(pid: int) -> int:
    """File descriptors ``pid`` (the kernel: it is asked after every execute) holds open; 0 if it is gone."""
    global _open_files_dir
    path = f"/proc/{pid}/fd"
    if _open_files_dir != path:
        if _open_files_dir is not None:
            _held.forget(_open_files_dir)  # a kernel that has been replaced
        _open_files_dir = path
    try:
        return len(_held.listdir(path))
    except OSError:
        _held.forget(path)
        return 0


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE every process here starts with (the container's ``nofile``)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ignores(pid: int, signum: int) -> bool | None:
    """Whether ``pid`` ignores ``signum`` now (its ``SigIgn`` mask); None if it is gone."""
    try:
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        return None
    return None


def thread_count(pid: int) -> int:
    """Threads of ``pid`` (each holds a pid of the cgroup's limit); 0 if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _pss(pid: int) -> int:
    try:
        for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_memory_exceeds(root: int, limit: int) -> bool:
    """Whether ``root`` and its descendants use more than ``limit`` bytes of memory.

    Summed RSS counts pages that forked children share copy-on-write once per child, so it only
    serves as a cheap upper bound; above the limit, proportional set sizes decide, unless the
    container's whole memory charge is below the limit too (reading them takes each process's
    memory-map lock, which a fork bomb's processes hold most of the time).
    """
    usage = cgroup_memory_usage() if cgroup_memory_limit() is not None else None
    if usage is not None and usage <= limit:
        return False
    table = process_table()
    pids = (root, *(pid for pid in descendants(root, table) if table[pid].live))
    rss = 0
    for pid in pids:
        try:
            rss += int(_read(f"/proc/{pid}/statm").split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    if rss <= limit or len(pids) == 1:
        return rss > limit
    return sum(_pss(pid) for pid in pids) > limit


def _read_int(path: str | Path) -> int | None:
    try:
        text = _held.read(str(path)).strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def cgroup_memory_limit() -> int | None:
    """The container's memory limit (cgroup v2 or v1), or None when unlimited or unknown."""
    for path in (_CGROUP / "memory.max", _CGROUP / "memory" / "memory.limit_in_bytes"):
        value = _read_int(path)
        if value is not None:
            # cgroup v1 reports "unlimited" as a huge page-aligned number.
            return value if value < (1 << 60) else None
    return None


def cgroup_memory_usage() -> int | None:
    """Bytes charged to the container's memory cgroup (includes tmpfs and page cache)."""
    for path in (_CGROUP / "memory.current", _CGROUP / "memory" / "memory.usage_in_bytes"):
        value = _read_int(path)
        if value is not None:
            return value
    return None


@functools.cache
def _oom_events() -> str | None:
    """The file that counts OOM kills (cgroup v2 or v1); looked up once, it is read after every execute."""
    return next(
        (str(path) for path in (_CGROUP / "memory.events", _CGROUP / "memory" / "memory.oom_control") if path.exists()),
        None,
    )


def oom_kill_count() -> int:
    """How many processes the kernel's OOM killer has killed in this cgroup so far."""
    path = _oom_events()
    if path is None:
        return 0
    try:
        for line in _held.read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def raise_oom_score(pid: int, score: int = 1000) -> bool:
    """Make ``pid`` (the kernel) the OOM killer's first choice; raising needs no capability."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(score))
    except OSError:
        return False
    return True
