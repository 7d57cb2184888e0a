"""Process and cgroup facts the runner acts on, read from /proc and /sys/fs/cgroup.

Leftover-process policy: the runner is a child subreaper, so every process started during an
execute, daemonised or not, stays its descendant. After each execute every descendant except the
kernel itself is sent SIGKILL and reaped. Background processes therefore never outlive the execute
that started them (documented in PROTOCOL.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from pathlib import Path

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_PAGE = os.sysconf("SC_PAGE_SIZE")
_CGROUP = Path("/sys/fs/cgroup")


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


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(root: int, parents: dict[int, int] | None = None) -> list[int]:
    """All live descendants of ``root`` (from ``parents``, or a fresh scan of /proc)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in (_parent_map() if parents is None else parents).items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def kill_leftovers(keep: set[int]) -> list[int]:
    """SIGKILL every descendant of this process except the pids in ``keep``; reap the ones we adopted.

    The kernel's own children are leftovers too: only the kernel process itself is in ``keep``.
    """
    me = os.getpid()
    parents = _parent_map()  # one scan serves both the kill and the reap
    victims = [pid for pid in descendants(me, parents) if pid not in keep]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for pid, ppid in parents.items():
        if ppid == me and pid not in keep:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    return victims


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_memory_exceeds(root: int, limit: int) -> bool:
    """Whether ``root`` and its descendants use more than ``limit`` bytes of memory.

    Summed RSS counts pages that forked children share copy-on-write once per child, so it only
    serves as a cheap upper bound; above the limit, proportional set sizes decide.
    """
    pids = (root, *descendants(root))
    rss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    if rss <= limit or len(pids) == 1:
        return rss > limit
    return sum(_pss(pid) for pid in pids) > limit


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
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


def oom_kill_count() -> int:
    """How many processes the kernel's OOM killer has killed in this cgroup so far."""
    for path in (_CGROUP / "memory.events", _CGROUP / "memory" / "memory.oom_control"):
        try:
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return 0


def raise_oom_score(pid: int, score: int = 1000) -> bool:
    """Make ``pid`` (the kernel) the OOM killer's first choice; raising needs no capability."""
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(score))
    except OSError:
        return False
    return True
