"""The index gate: a sandbox's only way out, and only to the package cache's index and files.

A sandbox has no network interface but loopback. Beside its runner socket, in the same read-only
directory, each sandbox gets ``index.sock``; the runner relays pip's HTTP from ``127.0.0.1:3141``
inside the sandbox to it. This gate answers there. It lets through exactly ``GET``/``HEAD`` of
``/simple/<project>/`` and ``GET`` of the files those pages link to (pip never asks for a file's head,
and answering one would have the cache fetch the whole file unbilled), forwards them to the package
cache (``package_cache.py``, which alone talks to the upstream index), and counts each session's bytes:
a file's whole length as soon as the cache answers, since the cache has fetched it by then; files it
refused a session for its limit (each once) may add up to ``_REFUSED_ALLOWANCE`` times the limit, after
which files are refused before the cache is asked. A sandbox holds at most
``_MAX_CONNECTIONS`` connections, idle ones close, and all close with it: a sandbox cannot fill the
orchestrator's file descriptors through its socket.
Index pages pip asks for reach it trimmed to the files its interpreter could install
(``index_pages.py``).
Everything else is refused with a status whose reason phrase says why: pip prints it.

Which session a request belongs to is the socket it arrived on, as for the runner channel: code
in a sandbox can reach its own socket only, so it can neither borrow another session's budget nor
reach anything but the cache's read-only index. The cache never stores what a sandbox sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from . import index_pages
from .settings import MiB, PackageSettings

log = structlog.get_logger(__name__)

SOCKET_NAME: Final = "index.sock"
# Inside the sandbox: where pip finds the index (the runner relays this port to ``SOCKET_NAME``).
SANDBOX_PORT: Final = 3141
SANDBOX_INDEX_URL: Final = f"http://127.0.0.1:{SANDBOX_PORT}/simple/"
# What pip shows (as "Looking in indexes: …") when installs are off; nothing listens there.
DISABLED_INDEX_URL: Final = f"http://127.0.0.1:{SANDBOX_PORT}/package-installs-are-disabled-on-this-server/"

# PEP 503 normalised project names, and distribution file names (wheels, sdists, PEP 658
# ``.metadata``) as the cache links them: relative, one path segment, no escapes.
_PATH = re.compile(
    r"^/simple/(?P<project>[a-z0-9](?:[a-z0-9-]{0,198}[a-z0-9])?)/"
    r"(?P<file>[A-Za-z0-9][A-Za-z0-9._+!-]{0,254})?$"
)
# Response headers worth passing on; hop-by-hop ones and the cache's own are dropped.
_PASS_HEADERS: Final = ("Content-Type", "Content-Length", "Content-Encoding", "ETag", "Last-Modified", "Vary")
_CHUNK: Final = 64 * 1024
# Connections one sandbox may hold open (pip uses one or two at a time); more are closed at once.
_MAX_CONNECTIONS: Final = 16
# A connection idle this long (or that never sent a request) is closed.
_IDLE_SECONDS: Final = 30.0
# Bytes of files refused for the session's limit (the cache fetched them all the same), as a multiple
# of the limit: enough for a few packages too large to install, not for fetching the index wholesale.
_REFUSED_ALLOWANCE: Final = 4
# Index pages up to this size are read whole to be trimmed (numpy's is 1.1 MiB); larger ones pass
# as they are: parsing holds the interpreter lock, whatever thread it runs on.
_MAX_PAGE_BYTES: Final = 4 * MiB
# Trimmed pages kept, so a sandbox asking for one page over and over costs one parse.
_TRIMMED_KEPT_BYTES: Final = 32 * MiB
_TRIMMED_KEPT_PAGES: Final = 4096


def cache_path(method: str, raw_path: str) -> str | None:
    """The package cache's path for an allowed request, else None (pure; ``raw_path`` undecoded)."""
    if method not in {"GET", "HEAD"}:
        return None
    match = _PATH.match(raw_path)
    if match is None or ".." in raw_path or (method == "HEAD" and match["file"]):
        return None
    return f"/index/{match['project']}/{match['file'] or ''}"


@dataclass
class _Budget:
    """One session's allowance: bytes over its life, requests at once; its open connections."""

    slots: asyncio.Semaphore
    site: web.UnixSite
    path: str
    used: int = 0
    # Files the cache fetched but the session was refused (its limit), and their bytes: bounded too.
    refused: int = 0
    refused_paths: set[str] = field(default_factory=set)
    connections: set[asyncio.Transport] = field(default_factory=set)


class _Server(web.Server):
    """aiohttp's low-level server, holding each sandbox to ``_MAX_CONNECTIONS`` open connections."""

    def __init__(self, gate: IndexGate) -> None:
        super().__init__(gate.handle, access_log=None, keepalive_timeout=_IDLE_SECONDS)
        self._gate = gate
        self._owners: dict[web.RequestHandler, tuple[_Budget, asyncio.Transport]] = {}

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        budget = self._gate.budget_of(transport)
        if budget is None or len(budget.connections) >= _MAX_CONNECTIONS:
            # Once the handler has finished setting up, as for a client that hung up at once.
            asyncio.get_running_loop().call_soon(transport.abort)
            return
        budget.connections.add(transport)
        self._owners[handler] = (budget, transport)

    def connection_lost(self, handler: web.RequestHandler, exc: BaseException | None = None) -> None:
        owner = self._owners.pop(handler, None)
        if owner is not None:
            owner[0].connections.discard(owner[1])
        super().connection_lost(handler, exc)


def _refuse(status: int, reason: str) -> web.Response:
    # pip reports a file download's failure as "<status> Client Error: <reason> for url: …".
    return web.Response(status=status, reason=reason, text=reason + "\n")


def _is_page(request: web.BaseRequest, path: str) -> bool:
    return request.method == "GET" and path.endswith("/")


def _trimmable(upstream: aiohttp.ClientResponse) -> bool:
    """Whether the cache's answer is a JSON index page ``index_pages`` can trim."""
    return (
        upstream.status == 200
        and upstream.content_type == index_pages.MEDIA_TYPE
        and "Content-Encoding" not in upstream.headers
        and upstream.content_length is not None
        and upstream.content_length <= _MAX_PAGE_BYTES
    )


class IndexGate:
    """Serves every sandbox's ``index.sock``; owns the HTTP client to the package cache."""

    def __init__(self, settings: PackageSettings) -> None:
        self._settings = settings
        self._upstream = settings.cache_url.rstrip("/")
        self._budgets: dict[str, _Budget] = {}
        self._by_path: dict[str, str] = {}
        self._runner: web.ServerRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._trimmed: OrderedDict[tuple[str, int, int, index_pages.Interpreter], bytes | None] = OrderedDict()
        self._trimmed_bytes = 0

    async def start(self) -> None:
        """Open the client and the (socketless) server the per-sandbox sites attach to."""
        self._runner = web.ServerRunner(_Server(self), handle_signals=False)
        await self._runner.setup()
        # Bytes pass through as the cache sent them: Content-Length must match what pip reads.
        self._client = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=64),
        )

    async def close(self) -> None:
        """Stop every site and the client."""
        for key in list(self._budgets):
            await self.close_sandbox(key)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def open_sandbox(self, key: str, directory: Path) -> None:
        """Listen on ``directory/index.sock`` for the sandbox ``key`` (again, after a restart)."""
        if key in self._budgets or self._runner is None:
            return
        path = directory / SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an earlier orchestrator process
        site = web.UnixSite(self._runner, str(path))
        await site.start()
        path.chmod(0o666)  # the sandbox's user connects through the read-only mount
        self._budgets[key] = _Budget(asyncio.Semaphore(self._settings.max_concurrent_requests), site, str(path))
        self._by_path[str(path)] = key

    async def close_sandbox(self, key: str) -> None:
        """Stop listening for ``key`` (idempotent); its budget goes with it."""
        budget = self._budgets.pop(key, None)
        if budget is None:
            return
        self._by_path.pop(budget.path, None)
        with contextlib.suppress(RuntimeError):
            await budget.site.stop()
        # Stopping the site only stops listening; what the sandbox still holds open goes now.
        for transport in list(budget.connections):
            transport.abort()

    def budget_of(self, transport: asyncio.BaseTransport | None) -> _Budget | None:
        """The budget of the sandbox whose socket ``transport`` arrived on; None once it has ended."""
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        key = self._by_path.get(str(sockname))
        return self._budgets.get(key) if key is not None else None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request from a sandbox."""
        budget = self.budget_of(request.transport)
        if budget is None:
            return _refuse(410, "this sandbox has ended")
        path = cache_path(request.method, request.raw_path)
        if path is None:
            return _refuse(403, "only the package index is reachable from a sandbox")
        limit = self._settings.max_download_bytes
        if budget.used >= limit:
            return _refuse(403, f"this session's download limit of {limit // MiB} MiB is used up")
        if not path.endswith("/") and budget.refused >= _REFUSED_ALLOWANCE * limit:
            return _refuse(403, f"this session was refused too many downloads over its limit of {limit // MiB} MiB")
        try:
            async with asyncio.timeout(self._settings.request_timeout_seconds):
                async with budget.slots:
                    return await self._forward(request, path, budget)
        except TimeoutError:
            log.warning("index_request_timeout", path=path)
            return _refuse(504, f"the package cache did not answer within {self._settings.request_timeout_seconds:g} s")

    async def _forward(self, request: web.BaseRequest, path: str, budget: _Budget) -> web.StreamResponse:
        assert self._client is not None
        page_for = index_pages.interpreter_of(request.headers.get("User-Agent")) if _is_page(request, path) else None
        headers = {name: request.headers[name] for name in ("Accept", "Accept-Encoding") if name in request.headers}
        if page_for is not None:
            headers["Accept-Encoding"] = "identity"  # to trim it; the cache is near
        limit = self._settings.max_download_bytes
        response: web.StreamResponse | None = None
        try:
            async with self._client.request(
                request.method, self._upstream + path, headers=headers, allow_redirects=False
            ) as upstream:
                if 300 <= upstream.status < 400:
                    # The cache gave up fetching the file and points at the origin, which a sandbox
                    # must never be sent to.
                    return _refuse(502, "the package cache could not fetch this file from the upstream index")
                length = upstream.content_length
                if length is not None and budget.used + length > limit:
                    if path not in budget.refused_paths:
                        budget.refused_paths.add(path)
                        budget.refused += length
                    return _refuse(403, f"this download would exceed the session's limit of {limit // MiB} MiB")
                if page_for is not None and _trimmable(upstream):
                    return await self._page(path, upstream, page_for, budget)
                # Known up front: all of it counts now (a client that hangs up early still had it fetched).
                budget.used += length or 0
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name in _PASS_HEADERS:
                    if name in upstream.headers:
                        response.headers[name] = upstream.headers[name]
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    if length is None:
                        budget.used += len(chunk)
                        if budget.used > limit:
                            break  # length unknown up front: cut the transfer, pip reports it broken
                    await response.write(chunk)
                else:
                    await response.write_eof()
                    return response
        except (aiohttp.ClientError, OSError) as exc:
            if response is None:
                log.warning("package_cache_unreachable", error=str(exc))
                return _refuse(502, "the package cache is unreachable")
            # Headers are sent: either side went away mid-transfer; all that is left is to hang up.
        if request.transport is not None:
            request.transport.close()
        return response

    async def _trim(self, path: str, page: bytes, interpreter: index_pages.Interpreter) -> bytes | None:
        """``index_pages.trim``, remembered by page content and interpreter."""
        key = (path, len(page), zlib.crc32(page), interpreter)
        if key in self._trimmed:
            self._trimmed.move_to_end(key)
            return self._trimmed[key]
        trimmed = await asyncio.to_thread(index_pages.trim, page, interpreter)
        self._trimmed[key] = trimmed
        self._trimmed_bytes += len(trimmed or b"")
        while self._trimmed_bytes > _TRIMMED_KEPT_BYTES or len(self._trimmed) > _TRIMMED_KEPT_PAGES:
            self._trimmed_bytes -= len(self._trimmed.popitem(last=False)[1] or b"")
        return trimmed

    async def _page(
        self, path: str, upstream: aiohttp.ClientResponse, interpreter: index_pages.Interpreter, budget: _Budget
    ) -> web.Response:
        """An index page, read whole and passed on trimmed to what the asking pip could install."""
        page = await upstream.read()
        # The whole page counts against the session's budget (``_forward`` checked its length against
        # what is left): it is what the gate fetched for it.
        budget.used += len(page)
        trimmed = await self._trim(path, page, interpreter)
        body = page if trimmed is None else trimmed
        dropped = {"Content-Length"} if trimmed is None else {"Content-Length", "ETag"}
        headers = {name: upstream.headers[name] for name in _PASS_HEADERS if name in upstream.headers}
        return web.Response(
            status=upstream.status,
            reason=upstream.reason,
            body=body,
            headers={name: value for name, value in headers.items() if name not in dropped},
        )
