"""Where the CPU goes: per-process CPU time from ``/proc``, grouped by role, over a time window.

On a small host the load figures are CPU-bound, so "CPU milliseconds per execute, by process
group" says what bounds them. Container processes are visible in the host's ``/proc``. The
``other`` group is everything else on the machine: work that is not ours shows up there.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
# First match wins: (group, substring of the command line).
_GROUPS = (
    # Before the runner: the interpreter's command line names the runner's package too.
    ("kernel", "sandbox_runner.interpreter"),
    # The floor's bare Jupyter kernel (bench/floor.py).
    ("floor kernel", "ipykernel_launcher"),
    ("runner", "sandbox_runner"),
    ("orchestrator", "-m orchestrator"),
    ("dockerd", "dockerd"),
    ("containerd-shim", "containerd-shim"),
    ("containerd", "containerd"),
    ("fuse-overlayfs", "fuse-overlayfs"),
)


def _group(pid: str, own: int) -> str:
    if int(pid) == own:
        return "bench client"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if not cmdline:
        return "kernel threads"
    return next((group for group, needle in _GROUPS if needle in cmdline), "other")


def snapshot() -> dict[int, tuple[str, int]]:
    """pid -> (group, utime+stime ticks) for every process now."""
    own = os.getpid()
    found: dict[int, tuple[str, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3 (state).
        ticks = int(fields[11]) + int(fields[12])
        found[int(entry.name)] = (_group(entry.name, own), ticks)
    return found


def cpu_seconds(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds per group between two snapshots (processes that exited in between are missed)."""
    spent: Counter[str] = Counter()
    for pid, (group, ticks) in after.items():
        spent[group] += ticks - (before[pid][1] if pid in before else 0)
    return {group: ticks / _TICKS for group, ticks in spent.most_common() if ticks > 0}
