"""Runaway processes: stopped while the code runs, swept when it ends, and reported in its outputs.

A fork bomb, a pile of threads or zombies fills the container's pids limit within milliseconds, and
the runner (at a better scheduling priority than the kernel and everything it starts) must then act
before the execute's own timeout: while code runs, every poll compares the pids in use with the
limit, and once fewer than a reserve are left, every process the kernel started is frozen and
killed (``procs.stop_leftovers``), the kernel itself kept. The kernel is the culprit when it holds
the pids in threads of its own, or when most of what was stopped are forks of the kernel still
running its code (``os.fork`` in a loop): then it must be restarted. When the execute ends,
whatever is still running besides the kernel is stopped the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from typing import Final

from . import procs

log = logging.getLogger("sandbox_runner")

# File descriptors the kernel needs free for itself (pipes of a shell escape, its own messages).
_FD_RESERVE: Final = 64
# How long the end-of-execute sweep waits for killed processes to be collected.
_REAP_SECONDS: Final = 1.0


def pid_reserve(limit: int) -> int:
    """Pids kept free for the runner: below this many a runaway is stopped."""
    return max(8, limit // 16)


def describe(names: Counter[str]) -> str:
    """``8 yes, sleep``: the processes stopped, most frequent first."""
    return ", ".join(name if count == 1 else f"{count} {name}" for name, count in names.most_common(5)) + (
        ", ..." if len(names) > 5 else ""
    )


def _count(names: Counter[str]) -> str:
    total = names.total()
    return f"{total} {'process' if total == 1 else 'processes'}"


class Containment:
    """The runaway policy of one execute at a time."""

    def __init__(self) -> None:
        self.stopped: Counter[str] = Counter()
        self.limit: int | None = None
        self.culprit: str | None = None

    def begin(self) -> None:
        """Forget the previous execute."""
        self.stopped = Counter()
        self.limit = self.culprit = None

    def check(self, kernel_pid: int, *, final: bool = False) -> bool:
        """Stop a runaway if the pids limit is nearly reached; True when the kernel itself must go.

        ``final``: the code has finished, so file descriptors the kernel still holds are its state,
        and a kernel with none to spare could not even start a shell escape: it must go too.
        """
        if final and (fds := procs.open_files(kernel_pid)) >= (limit := procs.open_files_limit()) - _FD_RESERVE:
            self.culprit = f"it held {fds} open files, and the limit is {limit}"
            return True
        if self.stopped:
            procs.reap_adopted({kernel_pid})  # what the last stop killed, so its pids come back
        usage = procs.pids_in_use()
        if usage is None:
            return False
        used, limit = usage
        if used < limit - pid_reserve(limit):
            return False
        self.limit = limit
        threads = procs.thread_count(kernel_pid)
        if threads >= limit // 2:
            self.culprit = f"it started {threads} threads and filled the limit of {limit} processes and threads"
            return True
        began = time.monotonic()
        stopped = procs.stop_leftovers({kernel_pid}, hold=kernel_pid)
        procs.reap_adopted({kernel_pid})
        if stopped:
            log.warning(
                "pids at %d of %d: stopped %d processes in %.3f s",
                used,
                limit,
                stopped.total(),
                time.monotonic() - began,
            )
        if not stopped:
            return False  # only zombies of the kernel: it collects them before the next execute
        self.stopped += stopped
        forks = self.stopped[procs.FORK_OF_HOLD]
        # A few forks caught between fork and exit (a zombie pile of the kernel's) are not a bomb.
        if forks >= limit // 4 and forks * 2 >= self.stopped.total():
            self.culprit = f"it forked itself over and over until the limit of {limit} processes was reached"
            return True
        return False

    async def finish(self, kernel_pid: int | None) -> str | None:
        """Stop what is still running besides the kernel; the note that says what was stopped, if anything."""
        keep = {kernel_pid} if kernel_pid is not None else set()
        # Nothing else runs (the common case) costs one listing of /proc instead of a full table.
        table = {} if procs.only({1, os.getpid(), os.getppid(), *keep}) else procs.process_table()
        if any(table[pid].live for pid in procs.descendants(os.getpid(), table) if pid not in keep):
            left = procs.stop_leftovers(keep, hold=kernel_pid)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _REAP_SECONDS
            # Killed processes turn into zombies in their own time; a Popen exit has no awaitable either.
            while procs.reap_adopted(keep) and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        else:
            left = Counter()
        notes = []
        if self.stopped:
            limit = f"the pids limit ({self.limit}) was reached"
            notes.append(f"[stopped {_count(self.stopped)} when {limit}: {describe(self.stopped)}]")
        if left:
            notes.append(f"[stopped {_count(left)} still running when the execute ended: {describe(left)}]")
        return "\n".join(notes) + "\n" if notes else None
