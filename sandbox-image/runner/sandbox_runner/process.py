"""The ``run`` and ``fetch`` ops: a command as a real process, one request at a time.

``run`` executes ``argv`` with ``stdin`` piped in, in a fresh directory that holds the uploaded
files and serves as the process's working directory, home and temp directory. Whatever the command
leaves behind is undone before the reply: every process it started is killed, the fresh directory
is removed, and new top-level entries in the shared writable directories are deleted, so the next
``run`` in this sandbox starts from the same state. The IPython kernel is neither used nor touched.

Memory is watched like the kernel's (RSS of the process tree against a limit, every 0.1 s), with
the container's cgroup limit behind it; either kill is reported as ``oom``. RLIMIT_AS is not used:
it counts reserved address space, which breaks OpenBLAS and JIT runtimes long before real use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .config import Limits, RunnerConfig
from .files import FileRejected, check_destinations, prepare_files, write_files
from .protocol import fail, ok
from .workspace import WorkspaceRefused, resolve_path

_POLL = 0.1
# Pipes still held open by a leftover that is being killed: they close within this.
_DRAIN_GRACE = 2.0
_READ_CHUNK = 64 * 1024
_MAX_TIMEOUT = 24 * 3600.0
_MAX_ARGS = 256


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the process has exited: ``Process.wait`` also waits for its pipes to close,
    which a leftover holding them open would delay until it is killed."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


async def _spawn(argv: list[str], home: Path, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, _Protocol]:
    loop = asyncio.get_running_loop()
    pipe = asyncio.subprocess.PIPE
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(_READ_CHUNK, loop),
        *argv,
        stdin=pipe,
        stdout=pipe,
        stderr=pipe,
        cwd=home,
        env=env,
        start_new_session=True,
    )
    return asyncio.subprocess.Process(transport, protocol, loop), protocol


class _Capped:
    """One output stream: keeps the first ``limit`` bytes, counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    async def drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(_READ_CHUNK):
            room = self.limit - len(self.data)
            self.data += chunk[: max(room, 0)]
            self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self, name: str) -> str:
        text = self.data.decode("utf-8", errors="ignore" if self.dropped else "replace")
        if self.dropped:
            # Cut at a character boundary (the ignore above), then say how much is missing.
            text += f"\n[{name} truncated: {self.dropped} bytes dropped]\n"
        return text


@dataclass
class _Request:
    argv: list[str]
    stdin: bytes | None
    timeout: float
    memory_bytes: int
    fetch: list[str] = field(default_factory=list)


def _parse(args: dict[str, Any]) -> _Request | tuple[str, str]:
    """The validated request, or (param, message) for a refusal."""
    argv = args.get("argv")
    if not isinstance(argv, list) or not argv or len(argv) > _MAX_ARGS or not all(isinstance(a, str) for a in argv):
        return "argv", f"argv must be a non-empty list of at most {_MAX_ARGS} strings"
    if any("\x00" in a for a in argv):
        return "argv", "argv must not contain NUL bytes"
    stdin = args.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        return "stdin", "stdin must be a string or null"
    timeout = args.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= _MAX_TIMEOUT:
        return "timeout", "timeout must be a positive number"
    memory = args.get("memory_bytes", 0)
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        return "memory_bytes", "memory_bytes must be a non-negative integer"
    fetch = args.get("fetch_files", [])
    if not isinstance(fetch, list) or not all(isinstance(p, str) and p and "\x00" not in p for p in fetch):
        return "fetch_files", "fetch_files must be a list of non-empty paths"
    return _Request(argv, None if stdin is None else stdin.encode("utf-8", "surrogateescape"), timeout, memory, fetch)


def read_files(root: Path, paths: list[str], limits: Limits) -> tuple[dict[str, str], int]:
    """Regular files at ``paths`` (relative to ``root``) as base64, and the bytes left out.

    Missing paths and directories are skipped, as SandboxFusion does, and so are paths the file
    routes refuse (absolute, ``..``, through a symlink out of ``root``); past ``max_files_bytes`` in
    total the remaining files are left out and counted.
    """
    found: dict[str, str] = {}
    total = dropped = 0
    for name in paths:
        try:
            path = resolve_path(root, name, limits)
        except WorkspaceRefused:
            continue
        with contextlib.suppress(OSError):
            if not path.is_file():
                continue
            size = path.stat().st_size
            if total + size > limits.max_files_bytes:
                dropped += size
                continue
            content = path.read_bytes()[: limits.max_files_bytes - total]
            total += len(content)
            found[name] = base64.b64encode(content).decode("ascii")
    return found, dropped


def _environment(home: Path, config: RunnerConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCI_")}
    env.pop("PYTEST_CURRENT_TEST", None)
    mpl = home / ".config" / "matplotlib"
    user_base = home / ".local"
    env.update(
        HOME=str(home),
        TMPDIR=str(home),
        PYTHONUSERBASE=str(user_base),
        # Console scripts of what the program installs (pip puts them in the user base's bin).
        PATH=os.pathsep.join([str(user_base / "bin"), *filter(None, [env.get("PATH")])]),
        MPLCONFIGDIR=str(mpl),
        XDG_CACHE_HOME=str(home / ".cache"),
        IPYTHONDIR=str(home / ".ipython"),
    )
    if config.mpl_seed_dir.is_dir():
        # A prebuilt font cache spares `import matplotlib` a multi-second rebuild in every run.
        with contextlib.suppress(OSError):
            shutil.copytree(config.mpl_seed_dir, mpl)
    return env


def _shared_dirs(config: RunnerConfig) -> list[Path]:
    """Writable places a run could leave things in for the next one (the sandbox names them)."""
    return [d for d in {config.workdir, *config.scrub_dirs} if d.is_dir()]


def _listing(dirs: list[Path]) -> dict[Path, set[str]]:
    listing: dict[Path, set[str]] = {}
    for directory in dirs:
        with contextlib.suppress(OSError):
            listing[directory] = set(os.listdir(directory))
    return listing


def _restore(before: dict[Path, set[str]]) -> None:
    for directory, names in before.items():
        with contextlib.suppress(OSError):
            for name in set(os.listdir(directory)) - names:
                path = directory / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()


def _memory_limit(request: _Request, config: RunnerConfig) -> int | None:
    ceiling = config.kernel_memory_bytes or None
    if ceiling is None and (cgroup := procs.cgroup_memory_limit()) is not None:
        ceiling = max(cgroup - config.memory_reserve_bytes, cgroup // 2)
    if request.memory_bytes:
        return min(request.memory_bytes, ceiling) if ceiling else request.memory_bytes
    return ceiling


async def _watch(pid: int, limit: int | None) -> bool:
    """Poll the process tree's memory; True once it went over ``limit`` (the caller kills it)."""
    if limit is None:
        await asyncio.Event().wait()
    while True:
        await asyncio.sleep(_POLL)
        if limit is not None and procs.tree_memory_exceeds(pid, limit):
            return True


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run(request_id: str, args: dict[str, Any], config: RunnerConfig, keep: set[int]) -> dict[str, Any]:
    """Carry out one ``run`` request; ``keep`` are pids the leftover sweep must spare (the kernel)."""
    parsed = _parse(args)
    if isinstance(parsed, tuple):
        return fail(request_id, "bad_request", parsed[1], parsed[0])
    shared = _shared_dirs(config)
    before = _listing(shared)
    home = config.workdir / f".run-{os.urandom(6).hex()}"
    try:
        try:
            files = prepare_files(args.get("files"), config.limits)
            home.mkdir(mode=0o700)
            check_destinations(home, files)
            write_files(home, files)
        except FileRejected as exc:
            return fail(request_id, "invalid_file", str(exc), exc.param)
        except OSError as exc:
            return fail(request_id, "file_write_failed", f"could not write the files: {exc}", "files")
        result = await _execute(parsed, home, config, keep)
        result["files"], dropped_files = read_files(home, parsed.fetch, config.limits)
        if dropped_files:
            result["dropped_bytes"]["files"] = dropped_files
        return ok(request_id, result)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        _restore(before)


async def _execute(request: _Request, home: Path, config: RunnerConfig, keep: set[int]) -> dict[str, Any]:
    limits = config.limits
    stdout, stderr = _Capped(limits.max_stream_bytes), _Capped(limits.max_stream_bytes)
    oom_before = procs.oom_kill_count()
    began = time.monotonic()
    try:
        process, protocol = await _spawn(request.argv, home, _environment(home, config))
    except OSError as exc:
        # The command itself is missing or not executable: as a shell would, exit 127 / 126.
        status = 127 if isinstance(exc, FileNotFoundError) else 126
        message = f"{request.argv[0]}: {exc.strerror}\n".encode()
        return _result(b"", message, status, 0.0, timed_out=False, oom=False)
    procs.raise_oom_score(process.pid)
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    drains = [
        asyncio.create_task(stdout.drain(process.stdout)),
        asyncio.create_task(stderr.drain(process.stderr)),
    ]
    feeder = asyncio.create_task(_feed(process.stdin, request.stdin))
    memory_limit = _memory_limit(request, config)
    watchdog = asyncio.create_task(_watch(process.pid, memory_limit))
    waiter = asyncio.create_task(protocol.exited.wait())
    done, _ = await asyncio.wait({waiter, watchdog}, timeout=request.timeout, return_when=asyncio.FIRST_COMPLETED)
    elapsed = time.monotonic() - began
    over_memory = watchdog in done
    timed_out = not done
    watchdog.cancel()
    # Also when the program has exited: children it left in its process group (still forking, say) die
    # at once here, where the sweep below would chase them one pid at a time.
    _kill_group(process.pid)
    if not waiter.done():
        await waiter
    # Only now, with our own child reaped by asyncio, may the sweep reap everything else.
    procs.kill_leftovers(keep)
    feeder.cancel()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*drains, return_exceptions=True), _DRAIN_GRACE)
    for task in (*drains, feeder, watchdog):
        task.cancel()
    code: int | None = process.returncode
    oom = over_memory or (code == -signal.SIGKILL and not timed_out and procs.oom_kill_count() > oom_before)
    result = _result(stdout, stderr, None if timed_out else code, elapsed, timed_out=timed_out, oom=oom)
    result["memory_limit_bytes"] = memory_limit
    return result


def _result(
    stdout: _Capped | bytes,
    stderr: _Capped | bytes,
    code: int | None,
    elapsed: float,
    *,
    timed_out: bool,
    oom: bool,
) -> dict[str, Any]:
    def text(stream: _Capped | bytes, name: str) -> str:
        return stream.text(name) if isinstance(stream, _Capped) else stream.decode("utf-8", "replace")

    dropped = {
        name: stream.dropped
        for name, stream in (("stdout", stdout), ("stderr", stderr))
        if isinstance(stream, _Capped) and stream.dropped
    }
    return {
        "stdout": text(stdout, "stdout"),
        "stderr": text(stderr, "stderr"),
        "return_code": code,
        "execution_time": round(elapsed, 6),
        "timed_out": timed_out,
        "oom": oom,
        "dropped_bytes": dropped,
        "files": {},
        "memory_limit_bytes": None,
    }


async def _feed(stream: asyncio.StreamWriter, data: bytes | None) -> None:
    with contextlib.suppress(OSError):
        if data:
            stream.write(data)
            await stream.drain()
    with contextlib.suppress(OSError):
        stream.close()


def fetch(request_id: str, args: dict[str, Any], config: RunnerConfig) -> dict[str, Any]:
    """Carry out one ``fetch`` request: files under the working directory, as base64."""
    paths = args.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p and "\x00" not in p for p in paths):
        return fail(request_id, "bad_request", "paths must be a list of non-empty paths", "paths")
    files, dropped = read_files(config.workdir, paths, config.limits)
    return ok(request_id, {"files": files, "dropped_bytes": dropped})
