"""The runner protocol contract: the orchestrator's ``RunnerClient`` against the real runner.

The two sides keep separate copies of the framing (they ship in different images), so this test
is what keeps them from drifting: same constants, same bytes on the wire, and the real client
driving the real runner, including resynchronising on a stream that it joins mid-conversation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket as socketlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sandbox_runner
from sandbox_runner import protocol
from sandbox_runner.protocol import ok

from orchestrator import runner_client
from orchestrator.backends.channel import SOCKET_NAME, SocketChannels
from orchestrator.errors import InvalidRequest, RunnerFailure
from orchestrator.runner_client import RunnerClient, RunnerRefused

pytestmark = pytest.mark.anyio

MAX_FRAME = 64 * 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def spawn_runner(
    root: Path, socket: Path | None = None, tmpdir: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -s -m sandbox_runner`` with its writable directories under ``root``.

    Raw pipes as its channel, or with ``socket`` the runner dials that path instead.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TCI_", "JPY_"))}
    if socket is not None:
        env["TCI_RUNNER_SOCKET"] = str(socket)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    for var, name in {
        "TCI_RUNNER_WORKDIR": "workspace",
        "IPYTHONDIR": "ipython",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "MPLCONFIGDIR": "mpl",
        "PYTHONUSERBASE": "userbase",
        "XDG_CACHE_HOME": "cache",
    }.items():
        env[var] = str(root / name)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-s",
        "-m",
        "sandbox_runner",
        stdin=asyncio.subprocess.PIPE if socket is None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if socket is None else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        limit=MAX_FRAME,
    )
    try:
        yield process
    finally:
        if socket is not None:
            # On a socket the runner dials again for ever; its container's end is a signal.
            process.terminate()
            await asyncio.wait_for(process.wait(), 15)
        else:
            assert process.stdin is not None
            process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
                pytest.fail("the runner did not exit when its stdin closed")


@pytest.fixture
async def runner_process(tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    async with spawn_runner(tmp_path) as process:
        yield process


def pipes(process: asyncio.subprocess.Process) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert process.stdout is not None
    assert process.stdin is not None
    return process.stdout, process.stdin


class KeepOpen:
    """A writer for a client that will be abandoned: closing the client must not close the pipe."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        pass


async def forward(source: asyncio.StreamReader, sink: asyncio.StreamReader) -> None:
    """Copy a stream into a reader that already holds other bytes."""
    while chunk := await source.read(65536):
        sink.feed_data(chunk)
    sink.feed_eof()


def test_constants_match() -> None:
    assert runner_client.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert runner_client.HEADER.format == protocol.HEADER.format
    assert runner_client.SYNC_MARKER == protocol.SYNC_MARKER
    assert runner_client.PROGRESS == protocol.PROGRESS
    assert runner_client.OPS == protocol.OPS


@pytest.mark.parametrize(
    "message",
    [
        {"id": "r1", "op": "execute", "args": {"code": "print('héllo ☃')", "timeout": 5}},
        {"id": "r2", "ok": True, "result": {"outputs": [{"type": "stdout", "data": "lone \udcff surrogate"}]}},
    ],
    ids=["request", "reply-with-surrogate"],
)
def test_both_sides_frame_identically(message: dict[str, Any]) -> None:
    frame = runner_client.encode_frame(message)
    assert frame == protocol.encode_frame(message)
    (length,) = protocol.HEADER.unpack(frame[:4])
    assert length == len(frame) - 4
    json.loads(frame[4:].decode("utf-8"))  # strict UTF-8: surrogates were replaced


async def test_client_drives_the_real_runner(runner_process: asyncio.subprocess.Process) -> None:
    client = RunnerClient(*pipes(runner_process), max_frame_bytes=MAX_FRAME)
    hello = await client.connect(timeout=30)
    assert hello["protocol"] == protocol.PROTOCOL_VERSION
    assert hello["version"] == sandbox_runner.__version__
    assert hello["execute_count"] == 0
    ready = await client.request("ready", {"timeout": 30}, timeout=35)
    assert ready["kernel_ready"] is True
    result = await client.request("execute", {"code": "x = 6 * 7\nprint(x)\nx", "timeout": 10}, timeout=30)
    assert result["outcome"] == "ok"
    assert result["outputs"] == [
        {"type": "stdout", "data": "42\n"},
        {"type": "execute_result", "data": {"text/plain": "42"}},
    ]
    assert set(result) == {
        "outputs",
        "outcome",
        "state_lost",
        "execution_count",
        "error_summary",
        "dropped_bytes",
        "duration_ms",
    }
    with pytest.raises(RunnerRefused) as caught:
        await client.request("execute", {"code": "x = 0", "files": [{"name": "/abs", "content": ""}]}, timeout=10)
    error = caught.value.to_error()
    assert isinstance(error, InvalidRequest)
    assert (error.code, error.param) == ("invalid_file", "files[0].name")
    stats = await client.request("stats", {}, timeout=10)
    assert stats["execute_count"] == 1
    assert stats["last_execute_at"] >= stats["started_at"]
    assert await client.request("interrupt", {}, timeout=10) == {"interrupted": False}
    await client.close()
    assert client.closed


async def test_progress_frames_and_file_ops_reach_the_client(runner_process: asyncio.subprocess.Process) -> None:
    client = RunnerClient(*pipes(runner_process), max_frame_bytes=MAX_FRAME)
    await client.connect(timeout=30)
    await client.request("ready", {"timeout": 30}, timeout=35)
    frames: list[dict[str, Any]] = []
    code = "print('a', flush=True)\nimport sys\nprint('b', file=sys.stderr, flush=True)\n7"
    args = {"code": code, "timeout": 10, "stream": True}
    result = await client.request("execute", args, timeout=30, on_progress=frames.append)
    assert [frame[runner_client.PROGRESS] for frame in frames[:1]] == ["started"]
    streamed = [frame["output"] for frame in frames if frame[runner_client.PROGRESS] == "output"]
    assert streamed == result["outputs"]
    assert streamed == [
        {"type": "stdout", "data": "a\n"},
        {"type": "stderr", "data": "b\n"},
        {"type": "execute_result", "data": {"text/plain": "7"}},
    ]
    quiet: list[dict[str, Any]] = []
    await client.request("execute", {"code": "print(1)", "timeout": 10}, timeout=30, on_progress=quiet.append)
    assert quiet == []  # progress only when asked for
    content = base64.b64encode(bytes(range(256))).decode()
    written = await client.request("write_file", {"path": "d/x.bin", "content": content}, timeout=10)
    assert written == {"path": "d/x.bin", "size": 256}
    listing = await client.request("list_files", {"path": "d"}, timeout=10)
    assert [(e["path"], e["type"], e["size"]) for e in listing["entries"]] == [("d/x.bin", "file", 256)]
    chunk = await client.request(
        "read_file", {"path": "d/x.bin", "offset": 250, "length": 100, "max_bytes": 1000}, timeout=10
    )
    assert (base64.b64decode(chunk["content"]), chunk["size"], chunk["eof"]) == (bytes(range(250, 256)), 256, True)
    for op, extra, code_ in [
        ("read_file", {"offset": 0, "length": 1, "max_bytes": 100}, "file_too_large"),
        ("read_file", {"path": "nope", "offset": 0, "length": 1, "max_bytes": 1000}, "file_not_found"),
        ("list_files", {"path": "../.."}, "invalid_file"),
    ]:
        with pytest.raises(RunnerRefused) as caught:
            await client.request(op, {"path": "d/x.bin", **extra}, timeout=10)
        assert caught.value.code == code_
    assert await client.request("delete_file", {"path": "d"}, timeout=10) == {}
    assert (await client.request("list_files", {"path": ""}, timeout=10))["entries"] == []


async def test_run_and_fetch_match_the_client_models(
    runner_process: asyncio.subprocess.Process, tmp_path: Path
) -> None:
    client = RunnerClient(*pipes(runner_process), max_frame_bytes=MAX_FRAME)
    await client.connect(timeout=30)
    args = {
        "argv": [sys.executable, "main.py"],
        "stdin": "7\n",
        "timeout": 20,
        "files": [
            {
                "name": "main.py",
                "content": "import sys\nprint(int(input()) * 6)\n"
                "open('out.bin', 'wb').write(b'\\x00\\xff')\nsys.exit(3)",
            }
        ],
        # Missing files, and paths the file routes refuse, are left out.
        "fetch_files": ["out.bin", "missing.txt", "/etc/passwd", "../../etc/hostname"],
    }
    raw = await client.request("run", args, timeout=30)
    result = runner_client.RunResult.model_validate(raw)
    assert set(raw) == set(runner_client.RunResult.model_fields)
    assert (result.stdout, result.return_code, result.timed_out, result.oom) == ("42\n", 3, False, False)
    assert result.files == {"out.bin": "AP8="}
    # The run's directory is gone; the working directory holds nothing new.
    assert not [p for p in (tmp_path / "workspace").iterdir() if p.name.startswith(".run-")]
    (tmp_path / "workspace" / "kept.txt").write_text("hi")
    fetched = runner_client.FetchResult.model_validate(
        await client.request("fetch", {"paths": ["kept.txt", "nope", "/etc/passwd"]}, timeout=10)
    )
    assert fetched.files == {"kept.txt": "aGk="}
    # A console script a program installs (pip writes it to the user base's bin) is on its PATH.
    script = 'mkdir -p "$PYTHONUSERBASE/bin"; printf "#!/bin/sh\\necho found\\n" > "$PYTHONUSERBASE/bin/tool"'
    installed = {"argv": ["sh", "-c", f'{script}; chmod +x "$PYTHONUSERBASE/bin/tool"; tool'], "timeout": 20}
    ran = runner_client.RunResult.model_validate(await client.request("run", installed, timeout=30))
    assert (ran.stdout, ran.return_code) == ("found\n", 0), ran
    with pytest.raises(RunnerRefused) as caught:
        await client.request("run", {"argv": []}, timeout=10)
    assert (caught.value.code, caught.value.param) == ("bad_request", "argv")
    await client.close()


async def test_resync_skips_garbage_forgeries_and_a_partial_frame(runner_process: asyncio.subprocess.Process) -> None:
    reader, writer = pipes(runner_process)
    # A reply nobody reads: it is in the stream ahead of the new client's hello reply.
    writer.write(protocol.encode_frame({"id": "old-1", "op": "execute", "args": {"code": "print('x' * 200000)"}}))
    await writer.drain()
    assert len(await reader.readexactly(10)) == 10  # start reading it, then walk away mid-frame
    stream = asyncio.StreamReader(limit=MAX_FRAME)
    stream.feed_data(
        b"\x00\x00\x00\x05hello\xff\xfe garbage "
        + protocol.sync_line("someone-elses-nonce")
        + protocol.encode_frame({"id": "r1", "ok": True, "result": {"protocol": 1, "forged": True}})
        + protocol.HEADER.pack(10**9)[:3]
    )
    pump = asyncio.create_task(forward(reader, stream))
    try:
        client = RunnerClient(stream, writer, max_frame_bytes=MAX_FRAME)
        hello = await client.connect(timeout=30)
        assert "forged" not in hello
        assert hello["protocol"] == protocol.PROTOCOL_VERSION
        await client.request("ready", {"timeout": 30}, timeout=35)
        result = await client.request("execute", {"code": "print('synced')", "timeout": 10}, timeout=30)
        assert result["outputs"] == [{"type": "stdout", "data": "synced\n"}]
        assert not client.closed
        await client.close()
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def test_reattach_during_an_execute_ignores_the_stale_reply(
    runner_process: asyncio.subprocess.Process, tmp_path: Path
) -> None:
    reader, writer = pipes(runner_process)
    first = RunnerClient(reader, KeepOpen(writer), max_frame_bytes=MAX_FRAME, name="first")  # type: ignore[arg-type]
    await first.connect(timeout=30)
    started = tmp_path / "workspace" / "started"
    slow = asyncio.create_task(
        first.request(
            "execute",
            {"code": "import time\nopen('started', 'w').close()\ntime.sleep(1)\nprint('stale')", "timeout": 10},
            timeout=30,
        )
    )
    deadline = time.monotonic() + 20
    while not started.exists():
        assert time.monotonic() < deadline, "the first execute never started"
        await asyncio.sleep(0.02)
    # The orchestrator restarts: the old connection is gone, the execute it sent is still running.
    slow.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await slow
    await first.close()

    # The new client's requests must not be confused with the old one's, whatever ids each picked.
    second = RunnerClient(reader, writer, max_frame_bytes=MAX_FRAME, name="second")
    await second.connect(timeout=30)
    result = await second.request("execute", {"code": "print('fresh')", "timeout": 10}, timeout=30)
    assert result["outputs"] == [{"type": "stdout", "data": "fresh\n"}], "a stale reply was taken for ours"
    await second.close()


async def test_runner_dials_the_socket_and_dials_again_after_a_restart(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="tci-c-"))  # socket paths must be short
    try:
        channels = SocketChannels(root, "contract", max_frame_bytes=MAX_FRAME)
        socket = await channels.open("k") / SOCKET_NAME
        kernel_tmp = root / "tmp"
        kernel_tmp.mkdir()
        async with spawn_runner(tmp_path, socket=socket, tmpdir=kernel_tmp):
            first = RunnerClient(
                *await channels.accept("k", timeout=30), max_frame_bytes=MAX_FRAME, hang_up_on_failure=True
            )
            await first.connect(timeout=30)
            await first.request("ready", {"timeout": 30}, timeout=35)
            result = await first.request("execute", {"code": "x = 41", "timeout": 10}, timeout=30)
            assert result["outcome"] == "ok"

            # The orchestrator hangs up (a session's client closed); the runner dials again on its own.
            await first.close()
            second = RunnerClient(*await channels.accept("k", timeout=10), max_frame_bytes=MAX_FRAME)
            await second.connect(timeout=10)
            await second.close()

            # The orchestrator is killed with a reply unread: the runner's read fails with a reset,
            # not an end of stream. That ends the stream too; the runner must not die of it.
            _, writer = await channels.accept("k", timeout=10)
            writer.transport.pause_reading()  # the reply stays in the kernel's buffer, unread
            writer.write(protocol.encode_frame({"id": "unread", "op": "stats", "args": {}}))
            await writer.drain()
            peek = socketlib.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
            deadline = time.monotonic() + 10
            while True:
                try:
                    if peek.recv(1, socketlib.MSG_PEEK | socketlib.MSG_DONTWAIT):
                        break
                except BlockingIOError:
                    pass
                assert time.monotonic() < deadline, "the runner never answered"
                await asyncio.sleep(0.01)
            peek.close()
            writer.transport.abort()
            reset = RunnerClient(*await channels.accept("k", timeout=10), max_frame_bytes=MAX_FRAME)
            assert (await reset.connect(timeout=10))["execute_count"] == 1
            await reset.close()

            # The orchestrator restarts: its listeners go away and a new process listens again.
            await channels.close_all()
            restarted = SocketChannels(root, "contract", max_frame_bytes=MAX_FRAME)
            third = RunnerClient(*await restarted.accept("k", timeout=10), max_frame_bytes=MAX_FRAME)
            hello = await third.connect(timeout=10)
            assert hello["execute_count"] == 1
            result = await third.request("execute", {"code": "print(x + 1)", "timeout": 10}, timeout=30)
            assert result["outputs"] == [{"type": "stdout", "data": "42\n"}], "state survives a reconnect"
            kernel_pid = (await third.request("stats", {}, timeout=10))["kernel_pid"]
            await third.close()
            await restarted.close("k")
        # The runner was stopped with SIGTERM: it shut its kernel down, which left no files behind.
        with pytest.raises(ProcessLookupError):
            os.kill(kernel_pid, 0)
        assert not list(kernel_tmp.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)


class ScriptedRunner:
    """Stands in for the runner's stdin: every request written is answered by feeding ``reader``."""

    def __init__(self, reader: asyncio.StreamReader, respond: Callable[[dict[str, Any]], bytes]) -> None:
        self._reader = reader
        self._respond = respond

    def write(self, data: bytes) -> None:
        self._reader.feed_data(self._respond(json.loads(data[protocol.HEADER.size :])))

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    closed = False


def hello_reply(request: dict[str, Any]) -> bytes:
    result = {"protocol": protocol.PROTOCOL_VERSION}
    return protocol.sync_line(request["args"]["nonce"]) + protocol.encode_frame(ok(request["id"], result))


async def test_oversize_frame_fails_without_being_read() -> None:
    reader = asyncio.StreamReader()
    writer = ScriptedRunner(
        reader, lambda r: protocol.sync_line(r["args"]["nonce"]) + protocol.HEADER.pack(1025) + b"rest"
    )
    client = RunnerClient(reader, writer, max_frame_bytes=1024)  # type: ignore[arg-type]
    began = time.monotonic()
    with pytest.raises(RunnerFailure, match="exceeds the 1024-byte cap"):
        await client.connect(timeout=30)
    assert time.monotonic() - began < 5, "it failed on the header, not by waiting for the body"
    assert client.closed
    assert await reader.readexactly(4) == b"rest", "the announced body was not read"


async def test_oversize_reply_after_connect_fails_the_request() -> None:
    reader = asyncio.StreamReader()
    writer = ScriptedRunner(
        reader, lambda r: hello_reply(r) if r["op"] == "hello" else protocol.HEADER.pack(10**8) + b"rest"
    )
    client = RunnerClient(reader, writer, max_frame_bytes=1024)  # type: ignore[arg-type]
    await client.connect(timeout=10)
    with pytest.raises(RunnerFailure, match="stream ended"):
        await client.request("stats", {}, timeout=10)
    assert client.closed
    assert await reader.readexactly(4) == b"rest", "the announced body was not read"
    assert not writer.closed, "a stdio or attach stream stays open to be resynchronised"


async def test_a_dialled_connection_is_hung_up_when_its_stream_breaks() -> None:
    reader = asyncio.StreamReader()
    writer = ScriptedRunner(reader, lambda r: hello_reply(r) if r["op"] == "hello" else b"\xff" * 4)
    client = RunnerClient(reader, writer, max_frame_bytes=1024, hang_up_on_failure=True)  # type: ignore[arg-type]
    await client.connect(timeout=10)
    with pytest.raises(RunnerFailure):
        await client.request("stats", {}, timeout=10)
    assert writer.closed, "the runner must see the end of the stream so that it dials again"


async def test_runner_hangs_up_on_an_oversize_request(runner_process: asyncio.subprocess.Process) -> None:
    reader, writer = pipes(runner_process)
    writer.write(protocol.HEADER.pack(protocol.MAX_REQUEST_BYTES + 1) + b"{}")
    await writer.drain()
    # Without a frame boundary nothing after this can be trusted: the runner exits instead of reading on.
    assert await asyncio.wait_for(reader.read(), 20) == b""
    assert await asyncio.wait_for(runner_process.wait(), 20) == 0
