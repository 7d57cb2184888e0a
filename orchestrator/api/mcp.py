"""The MCP endpoint (``/mcp``): the session layer as Model Context Protocol tools.

Built on the official ``mcp`` SDK's ``MCPServer``, served as stateless streamable HTTP with JSON
replies, and authenticated like every other route: the bearer key names the tenant (``tenancy``),
carried to the tools in a context variable the SDK passes from the request to the handler.
Sessions made here are ordinary sessions (same caps, lifespan and reaper); ``execute_code``
returns the ``session_id`` to reuse, and ``close_session`` ends one, so nothing is left running
by an agent that forgets.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextvars import ContextVar
from typing import Final, Literal, TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import BlobResourceContents, CallToolResult, EmbeddedResource, ImageContent, TextContent
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..errors import OrchestratorError, RequestTooLarge
from ..models import ExecuteResult
from ..schemas import FileInput, render_sessions
from ..workspace import media_type
from .deps import Services

PATH: Final = "/mcp"
_IMAGE_TYPES: Final = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")
# Display types a model can read as text, in the order they are preferred.
_TEXT_TYPES: Final = ("text/plain", "text/markdown", "application/json", "text/latex", "text/html")
# The whole file is held, base64-encoded and JSON-encoded in the control plane: larger files are the
# download route's, which streams them. As large as the SDK lets a request be.
MAX_READ_BYTES: Final = 4 * 1024 * 1024

T = TypeVar("T")
_tenant: ContextVar[str] = ContextVar("mcp_tenant")
Content = TextContent | ImageContent | EmbeddedResource


def execute_content(result: ExecuteResult) -> list[Content]:
    """Outputs as MCP content: streams and errors as text, images as images, other bundles as text."""
    content: list[Content] = []
    for output in result.outputs:
        data = output["data"]
        if isinstance(data, str):
            prefix = "" if output["type"] == "stdout" else f"[{output['type']}]\n"
            content.append(TextContent(text=prefix + data))
            continue
        content.append(_display_content(data))
    content.append(TextContent(text=f"session_id: {result.session_id} (outcome: {result.outcome})"))
    return content


def _display_content(data: dict[str, object]) -> Content:
    """One display bundle: its image if it has a valid one, else its text form, else a note of what it was."""
    image = next((kind for kind in _IMAGE_TYPES if kind in data), None)
    if image is not None:
        raw = str(data[image])
        if image == "image/svg+xml":
            return ImageContent(data=base64.b64encode(raw.encode()).decode(), mime_type=image)
        try:
            encoded = "".join(raw.split())  # base64 wrapped in lines (base64.encodebytes) is still an image
            base64.b64decode(encoded, validate=True)
            return ImageContent(data=encoded, mime_type=image)
        except (binascii.Error, ValueError):
            pass  # not an image a client could show: its text form, or the note
    kind = next((kind for kind in _TEXT_TYPES if kind in data), None)
    if kind is None:
        return TextContent(text=f"[a display of {', '.join(sorted(data))}, with no text form]")
    value = data[kind]
    text = value if isinstance(value, str) else json.dumps(value)
    return TextContent(text=text if kind == "text/plain" else f"[{kind}]\n{text}")


class McpEndpoint:
    """The MCP server and the ASGI endpoint that authenticates and hands requests to it."""

    def __init__(self) -> None:
        self.services: Services | None = None
        with _logging_untouched():
            self.server: MCPServer = MCPServer(
                name="tci-orchestrator",
                instructions=(
                    "Run Python in stateful sandboxed sessions. execute_code returns a session_id: pass it again "
                    "to keep variables and files; call close_session when done."
                ),
            )
        self._register()
        # DNS-rebinding protection is the SDK's guard for unauthenticated local servers; this one
        # requires the same bearer key as the TCI routes, with the same exposure.
        self.server.streamable_http_app(
            streamable_http_path=PATH,
            stateless_http=True,
            json_response=True,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )

    @contextlib.asynccontextmanager
    async def running(self, services: Services) -> AsyncIterator[None]:
        """Serve while the app's services live (the app's lifespan enters this)."""
        self.services = services
        try:
            async with self.server.session_manager.run():
                yield
        finally:
            self.services = None

    @staticmethod
    @contextlib.contextmanager
    def as_tenant(tenant: str) -> Iterator[None]:
        """Call the tools as ``tenant``: what the endpoint does per request, for in-process clients."""
        token = _tenant.set(tenant)
        try:
            yield
        finally:
            _tenant.reset(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        services: Services = request.state.services
        with self.as_tenant(services.authenticator.tenant_for(request.headers.get("authorization"))):
            await self.server.session_manager.handle_request(scope, receive, send)

    def _services(self) -> tuple[Services, str]:
        if self.services is None:
            raise ToolError("the service is not running")
        try:
            return self.services, _tenant.get()
        except LookupError as exc:
            raise ToolError("no tenant: call through the authenticated endpoint") from exc

    def _register(self) -> None:
        server = self.server

        @server.tool()
        async def execute_code(
            code: str, session_id: str | None = None, files: list[FileInput] | None = None
        ) -> CallToolResult:
            """Run Python (IPython syntax: `!cmd`, `%magic`) in a stateful sandbox session.

            Omit session_id to start a new session; pass the returned session_id to keep state.
            files are written into the working directory before the code runs.
            """
            services, tenant = self._services()
            uploads = [file.model_dump() for file in files] if files else None
            timeout = services.settings.execute_timeout_seconds
            result = await _call(services.manager.execute(tenant, session_id, code, uploads, timeout))
            structured = {"session_id": result.session_id, "outcome": result.outcome, "state_lost": result.state_lost}
            return CallToolResult(
                content=list(execute_content(result)),
                structured_content=structured,
                is_error=result.outcome not in {"ok"},
            )

        @server.tool()
        async def list_sessions() -> str:
            """Your live sessions, with their expiry times (JSON)."""
            services, tenant = self._services()
            return json.dumps(render_sessions(services.manager.sessions_of(tenant))["data"]["sessions"])

        @server.tool()
        async def close_session(session_id: str) -> str:
            """End a session now and remove its sandbox."""
            services, tenant = self._services()
            await _call(services.manager.close(tenant, session_id))
            return f"session {session_id} closed"

        @server.tool()
        async def read_file(session_id: str, path: str) -> Content:
            """Read a file from a session's working directory (text, an image, or base64 bytes), up to 4 MiB."""
            services, tenant = self._services()
            try:
                data = await services.files.read_all(tenant, session_id, path, MAX_READ_BYTES)
            except RequestTooLarge as exc:
                where = f"GET /tci/sessions/{session_id}/files/{path}"
                message = f"{exc.code}: {exc.message}; read_file holds a file whole, download it from {where}"
                raise ToolError(message) from exc
            except OrchestratorError as exc:
                raise ToolError(f"{exc.code}: {exc.message}") from exc
            kind = media_type(path)
            if kind in _IMAGE_TYPES[:3]:
                return ImageContent(data=base64.b64encode(data).decode(), mime_type=kind)
            try:
                return TextContent(text=data.decode("utf-8"))
            except UnicodeDecodeError:
                blob = BlobResourceContents(uri=f"file:///{path}", mime_type=kind, blob=base64.b64encode(data).decode())
                return EmbeddedResource(resource=blob)

        @server.tool()
        async def write_file(
            session_id: str, path: str, content: str, encoding: Literal["string", "base64"] = "string"
        ) -> str:
            """Write a file into a session's working directory (parents are created)."""
            services, tenant = self._services()
            try:
                raw = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
            except (binascii.Error, ValueError) as exc:
                raise ToolError(f"content is not valid base64: {exc}") from exc
            stored, size = await _call(services.files.write(tenant, session_id, path, raw))
            return f"wrote {size} bytes to {stored}"


@contextlib.contextmanager
def _logging_untouched() -> Iterator[None]:
    """MCPServer configures the root logger (``basicConfig``); logging is ``logging.py``'s alone."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def _call(awaitable: Awaitable[T]) -> T:
    """Our errors as tool errors: the model reads the message (nothing ran when one is raised)."""
    try:
        return await awaitable
    except OrchestratorError as exc:
        raise ToolError(f"{exc.code}: {exc.message}") from exc
