"""The index gate against a stand-in package cache: what passes, what is refused, and the budget."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from orchestrator import index_gate, index_pages
from orchestrator.backends.channel import SocketChannels
from orchestrator.backends.docker_spec import container_config, pip_environment
from orchestrator.index_gate import DISABLED_INDEX_URL, SANDBOX_INDEX_URL, SOCKET_NAME, IndexGate, cache_path
from orchestrator.index_pages import MEDIA_TYPE
from orchestrator.settings import MiB, PackageSettings, SandboxSettings

pytestmark = pytest.mark.anyio

WHEEL = "tabulate-0.10.0-py3-none-any.whl"
UJSON_PAGE = json.dumps({"meta": {"api-version": "1.0"}, "name": "ujson", "files": [
    {"filename": name, "url": name, "hashes": {"sha256": "00"}}
    for name in ("ujson-5.10.0.tar.gz", "ujson-5.10.0-cp311-cp311-manylinux_2_17_x86_64.whl",
                 "ujson-5.10.0-cp311-cp311-win_amd64.whl")
]}).encode()  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/simple/tabulate/", "/index/tabulate/"),
        ("HEAD", "/simple/tabulate/", "/index/tabulate/"),
        # pip never asks; the cache would fetch the whole file to answer, and a head carries no bytes to bill.
        ("HEAD", f"/simple/tabulate/{WHEEL}", None),
        ("GET", f"/simple/tabulate/{WHEEL}", f"/index/tabulate/{WHEEL}"),
        ("GET", f"/simple/tabulate/{WHEEL}.metadata", f"/index/tabulate/{WHEEL}.metadata"),
        ("GET", "/simple/zope-interface/", "/index/zope-interface/"),
        ("GET", "/simple/", None),  # the full project list: tens of MB nobody in a sandbox needs
        ("GET", "/", None),
        ("GET", "/health", None),
        ("GET", "/index/tabulate/", None),  # the cache's own paths
        ("DELETE", "/simple/tabulate/", None),
        ("POST", "/simple/tabulate/", None),
        ("GET", "/simple/../cache/list", None),
        ("GET", "/simple/tabulate/..%2f..%2fcache", None),
        ("GET", "/simple/Tabulate/", None),  # pip always asks for the normalised name
        ("GET", "/simple/tabulate", None),
        ("GET", "/simple/tabulate/a/b", None),
        ("GET", "/simple/tabulate/?x=1", None),
        ("GET", f"/simple/tabulate/{WHEEL}?x=1", None),
    ],
)
def test_only_index_reads_pass(method: str, path: str, expected: str | None) -> None:
    assert cache_path(method, path) == expected


def test_sandbox_pip_uses_the_relay_or_says_installs_are_off() -> None:
    sandbox = SandboxSettings()
    on = pip_environment(sandbox, PackageSettings())
    assert on["PIP_INDEX_URL"] == SANDBOX_INDEX_URL
    assert on["TCI_RUNNER_INDEX_SOCKET"].endswith("/" + SOCKET_NAME)
    off = pip_environment(sandbox, None)
    assert off == {"PIP_INDEX_URL": DISABLED_INDEX_URL, "PIP_RETRIES": "0"}
    assert pip_environment(SandboxSettings(network="bridge"), None) == {}  # egress chosen on purpose
    # Without a socket directory (the attach channel) there is no gate to relay to.
    config = container_config(sandbox, name="n", labels={}, seccomp_profile="{}", packages=PackageSettings())
    assert config["environment"]["PIP_INDEX_URL"] == DISABLED_INDEX_URL
    assert not any("CACHE" in key or "PASSWORD" in key for key in config["environment"])


class StandIn:
    """A package cache with one project, one file, and knobs for the failure cases."""

    def __init__(self) -> None:
        self.body = b"x" * (300 * 1024)
        self.hang = asyncio.Event()
        self.requests: list[str] = []
        self.chunked = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/index/tabulate/", self.page)
        app.router.add_get(f"/index/tabulate/{WHEEL}", self.file)
        app.router.add_get("/index/moved/", self.moved)
        app.router.add_get("/index/slow/", self.slow)
        app.router.add_get("/index/ujson/", self.json_page)
        return app

    async def json_page(self, request: web.Request) -> web.Response:
        headers = {"ETag": '"whole"'}
        if "gzip" not in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=UJSON_PAGE, content_type=MEDIA_TYPE, headers=headers)
        # As proxpi does when asked.
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=gzip.compress(UJSON_PAGE), content_type=MEDIA_TYPE, headers=headers)

    async def page(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        return web.Response(text=f'<a href="{WHEEL}#sha256=00">{WHEEL}</a>', content_type="text/html")

    async def file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        if not self.chunked:
            return web.Response(body=self.body, content_type="application/octet-stream")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(self.body), 64 * 1024):
            await response.write(self.body[i : i + 64 * 1024])
        await response.write_eof()
        return response

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("https://files.example.invalid/elsewhere")

    async def slow(self, request: web.Request) -> web.Response:
        await self.hang.wait()
        return web.Response(text="late")


@pytest.fixture
def root() -> Iterator[Path]:
    short = Path(tempfile.mkdtemp(prefix="tci-g-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
async def cache() -> AsyncIterator[tuple[StandIn, str]]:
    stand_in = StandIn()
    runner = web.AppRunner(stand_in.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield stand_in, f"http://127.0.0.1:{port}"
    stand_in.hang.set()
    await runner.cleanup()


async def gate_for(cache_url: str, root: Path, **settings: float) -> tuple[IndexGate, SocketChannels]:
    gate = IndexGate(PackageSettings(cache_url=cache_url, **settings))
    await gate.start()
    return gate, SocketChannels(root, "inst", max_frame_bytes=MiB, gate=gate)


async def get(
    socket: Path, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    status, reason, _, body = await fetch(socket, path, method, headers)
    return status, reason, body


async def fetch(
    socket: Path, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, CIMultiDict[str], bytes]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as client,
        client.request(method, f"http://sandbox{path}", headers=headers) as response,
    ):
        return response.status, response.reason or "", CIMultiDict(response.headers), await response.read()


async def test_index_pages_and_files_pass_through_the_sandbox_socket(cache: tuple[StandIn, str], root: Path) -> None:
    stand_in, url = cache
    gate, channels = await gate_for(url, root)
    try:
        directory = await channels.open("k1")
        socket = directory / SOCKET_NAME
        assert stat.S_IMODE(socket.stat().st_mode) == 0o666  # the sandbox user connects through the mount
        status, _, body = await get(socket, "/simple/tabulate/")
        assert (status, body.decode()) == (200, f'<a href="{WHEEL}#sha256=00">{WHEEL}</a>')
        status, _, body = await get(socket, f"/simple/tabulate/{WHEEL}")
        assert (status, body) == (200, stand_in.body)
        status, reason, _ = await get(socket, "/health")
        assert (status, reason) == (403, "only the package index is reachable from a sandbox")
        status, reason, _ = await get(socket, "/simple/tabulate/", method="DELETE")
        assert status == 403
        assert stand_in.requests == ["/index/tabulate/", f"/index/tabulate/{WHEEL}"]
        # Gone with its sandbox: the socket is removed with the directory.
        await channels.close("k1")
        assert not socket.exists()
    finally:
        await channels.close_all()
        await gate.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["length-known", "chunked"])
async def test_a_session_cannot_download_more_than_its_budget(
    cache: tuple[StandIn, str], root: Path, chunked: bool
) -> None:
    stand_in, url = cache
    stand_in.body = b"y" * (700 * 1024)  # two of these exceed 1 MiB
    stand_in.chunked = chunked
    gate, channels = await gate_for(url, root, max_download_bytes=MiB)
    try:
        first = (await channels.open("a")) / SOCKET_NAME
        other = (await channels.open("b")) / SOCKET_NAME
        assert (await get(first, f"/simple/tabulate/{WHEEL}"))[0] == 200
        if chunked:
            # Length unknown up front: the transfer is cut where the budget ends, and it is spent.
            with pytest.raises(aiohttp.ClientPayloadError):
                await get(first, f"/simple/tabulate/{WHEEL}")
            status, reason, _ = await get(first, "/simple/tabulate/")
            assert (status, reason) == (403, "this session's download limit of 1 MiB is used up")
        else:
            # Refused before a byte moved: what is left of the budget stays usable.
            status, reason, _ = await get(first, f"/simple/tabulate/{WHEEL}")
            assert (status, reason) == (403, "this download would exceed the session's limit of 1 MiB")
            assert (await get(first, "/simple/tabulate/"))[0] == 200
            # Asked for again, a refused file counts once: the session is not locked out by retries.
            for _ in range(8):
                assert (await get(first, f"/simple/tabulate/{WHEEL}"))[0] == 403
            assert (await get(first, "/simple/tabulate/"))[0] == 200
        # Another session's budget is its own.
        assert (await get(other, f"/simple/tabulate/{WHEEL}"))[0] == 200
    finally:
        await channels.close_all()
        await gate.close()


async def test_files_refused_for_the_limit_add_up_to_a_bound(cache: tuple[StandIn, str], root: Path) -> None:
    stand_in, url = cache
    stand_in.body = b"z" * (5 * MiB)  # the cache fetches it to answer, though the session may not have it
    gate, channels = await gate_for(url, root, max_download_bytes=MiB)
    try:
        socket = (await channels.open("a")) / SOCKET_NAME
        status, reason, _ = await get(socket, f"/simple/tabulate/{WHEEL}")
        assert (status, reason) == (403, "this download would exceed the session's limit of 1 MiB")
        # Past the allowance, files are refused before the cache is asked; pages still pass.
        status, reason, _ = await get(socket, f"/simple/tabulate/{WHEEL}")
        assert (status, reason) == (403, "this session was refused too many downloads over its limit of 1 MiB")
        assert stand_in.requests == [f"/index/tabulate/{WHEEL}"]
        assert (await get(socket, "/simple/tabulate/"))[0] == 200
    finally:
        await channels.close_all()
        await gate.close()


async def test_a_file_counts_whole_even_when_the_session_hangs_up_early(cache: tuple[StandIn, str], root: Path) -> None:
    stand_in, url = cache
    stand_in.body = b"y" * (700 * 1024)
    gate, channels = await gate_for(url, root, max_download_bytes=MiB)
    try:
        socket = (await channels.open("a")) / SOCKET_NAME
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as client,
            client.get(f"http://sandbox/simple/tabulate/{WHEEL}") as response,
        ):
            assert response.status == 200  # headers only: the body is never read
        status, reason, _ = await get(socket, f"/simple/tabulate/{WHEEL}")
        assert (status, reason) == (403, "this download would exceed the session's limit of 1 MiB")
    finally:
        await channels.close_all()
        await gate.close()


async def test_a_sandbox_holds_few_connections_and_loses_them_when_it_ends(
    cache: tuple[StandIn, str], root: Path
) -> None:
    _, url = cache
    gate, channels = await gate_for(url, root)
    try:
        socket = (await channels.open("a")) / SOCKET_NAME
        other = (await channels.open("b")) / SOCKET_NAME
        held = [await asyncio.open_unix_connection(str(socket)) for _ in range(40)]
        # Past the cap, connections are closed at once: reading one ends without a byte.
        closed = 0
        for reader, _ in held:
            try:
                data = await asyncio.wait_for(reader.read(1), timeout=0.2)
            except TimeoutError:
                continue  # held open, waiting for a request
            closed += data == b""
        assert closed == 40 - index_gate._MAX_CONNECTIONS
        # The other sandbox's requests are unaffected.
        assert (await get(other, "/simple/tabulate/"))[0] == 200
        # Ended: what it still held is closed too, not just the listening socket.
        await channels.close("a")
        ends = [await asyncio.wait_for(reader.read(1), timeout=5) for reader, _ in held]
        assert ends == [b""] * 40
        for _, writer in held:
            writer.close()
    finally:
        await channels.close_all()
        await gate.close()


async def test_redirects_timeouts_and_a_missing_cache_are_clear_errors(cache: tuple[StandIn, str], root: Path) -> None:
    _, url = cache
    gate, channels = await gate_for(url, root, request_timeout_seconds=0.5)
    dead_gate, dead_channels = await gate_for("http://127.0.0.1:9", root / "dead")
    try:
        socket = (await channels.open("k")) / SOCKET_NAME
        status, reason, _ = await get(socket, "/simple/moved/")
        assert (status, reason) == (502, "the package cache could not fetch this file from the upstream index")
        status, reason, _ = await get(socket, "/simple/slow/")
        assert (status, reason) == (504, "the package cache did not answer within 0.5 s")
        dead = (await dead_channels.open("k")) / SOCKET_NAME
        status, reason, _ = await get(dead, "/simple/tabulate/")
        assert (status, reason) == (502, "the package cache is unreachable")
    finally:
        for c, g in ((channels, gate), (dead_channels, dead_gate)):
            await c.close_all()
            await g.close()


async def test_a_pip_gets_index_pages_trimmed_to_what_it_could_install(
    cache: tuple[StandIn, str], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = cache
    gate, channels = await gate_for(url, root)
    try:
        socket = (await channels.open("k")) / SOCKET_NAME
        interpreter = json.dumps({
            "cpu": "x86_64",
            "distro": {"libc": {"lib": "glibc", "version": "2.36"}},
            "implementation": {"name": "CPython", "version": "3.11.2"},
        })  # fmt: skip
        pip = {"User-Agent": f"pip/26.3 {interpreter}", "Accept": MEDIA_TYPE, "Accept-Encoding": "gzip, deflate"}
        status, _, headers, body = await fetch(socket, "/simple/ujson/", headers=pip)
        assert status == 200
        assert [f["filename"] for f in json.loads(body)["files"]] == [
            "ujson-5.10.0.tar.gz",
            "ujson-5.10.0-cp311-cp311-manylinux_2_17_x86_64.whl",
        ]
        assert headers["Content-Type"] == MEDIA_TYPE
        assert int(headers["Content-Length"]) == len(body)
        assert "ETag" not in headers  # it named the whole page
        # Anything but a pip that names its interpreter gets the page as the cache sent it.
        # The same page again is not parsed again.
        parsed: list[bytes] = []
        trim = index_pages.trim
        monkeypatch.setattr(index_pages, "trim", lambda page, who: parsed.append(page) or trim(page, who))
        assert (await fetch(socket, "/simple/ujson/", headers=pip))[3] == body
        assert parsed == []
        other = {"Accept": MEDIA_TYPE, "Accept-Encoding": "gzip"}
        status, _, headers, body = await fetch(socket, "/simple/ujson/", headers=other)
        assert (status, body, headers["ETag"], headers["Content-Encoding"]) == (200, UJSON_PAGE, '"whole"', "gzip")
    finally:
        await channels.close_all()
        await gate.close()
