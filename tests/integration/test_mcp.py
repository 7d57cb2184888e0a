"""The MCP endpoint, driven by the official ``mcp`` SDK's client: in-process and over HTTP."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import pytest
from fastapi.testclient import TestClient
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, TextContent

from orchestrator.api.mcp import McpEndpoint
from orchestrator.app import create_app
from orchestrator.settings import Settings

from .conftest import AUTH, live_server

pytestmark = pytest.mark.docker

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"


def texts(result: CallToolResult) -> str:
    return "".join(block.text for block in result.content if isinstance(block, TextContent))


async def two_calls_in_one_session(client: Client) -> dict[str, Any]:
    """The scenario both transports run; returns what the checks need."""
    tools = {tool.name for tool in (await client.list_tools()).tools}
    upload = [{"name": "in/seed.txt", "encoding": "string", "content": "20"}]
    first = await client.call_tool(
        "execute_code", {"code": "x = int(open('in/seed.txt').read())\nprint('set')", "files": upload}
    )
    assert first.structured_content is not None
    session_id = first.structured_content["session_id"]
    second = await client.call_tool("execute_code", {"code": "print(x + 22)", "session_id": session_id})
    plot = await client.call_tool("execute_code", {"code": PLOT, "session_id": session_id})
    failed = await client.call_tool("execute_code", {"code": "1/0", "session_id": session_id})
    wrote = await client.call_tool("write_file", {"session_id": session_id, "path": "notes/a.txt", "content": "hi"})
    read = await client.call_tool("read_file", {"session_id": session_id, "path": "notes/a.txt"})
    big = "open('big.bin', 'wb').write(b'x' * (4 * 2**20 + 1))\n"
    shown = await client.call_tool(
        "execute_code",
        {
            "code": big + "display({'application/json': {'a': 1}}, {'image/png': '@@not base64@@'}, raw=True)",
            "session_id": session_id,
        },
    )
    too_big = await client.call_tool("read_file", {"session_id": session_id, "path": "big.bin"})
    listed = await client.call_tool("list_sessions", {})
    closed = await client.call_tool("close_session", {"session_id": session_id})
    gone = await client.call_tool("execute_code", {"code": "print(x)", "session_id": session_id})
    return {
        "tools": tools,
        "session_id": session_id,
        "first": first,
        "second": second,
        "plot": plot,
        "failed": failed,
        "wrote": texts(wrote),
        "read": texts(read),
        "shown": shown,
        "too_big": too_big,
        "listed": texts(listed),
        "closed": closed,
        "gone": gone,
    }


def check(outcome: dict[str, Any]) -> None:
    assert {"execute_code", "list_sessions", "close_session", "read_file", "write_file"} <= outcome["tools"]
    session_id = outcome["session_id"]
    assert texts(outcome["first"]).startswith("set\n")
    assert outcome["second"].is_error is False
    assert texts(outcome["second"]).startswith("42\n")
    assert session_id in texts(outcome["second"])
    images = [block for block in outcome["plot"].content if isinstance(block, ImageContent)]
    assert len(images) == 1
    assert images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
    assert outcome["failed"].is_error is True
    assert "ZeroDivisionError" in texts(outcome["failed"])
    assert outcome["wrote"] == "wrote 2 bytes to notes/a.txt"
    assert outcome["read"] == "hi"
    # Displays with no text/plain and no valid image are said, not dropped or passed on as images.
    assert not any(isinstance(block, ImageContent) for block in outcome["shown"].content)
    assert texts(outcome["shown"]).startswith('[application/json]\n{"a": 1}[a display of image/png, with no text form]')
    assert outcome["too_big"].is_error is True
    assert "file_too_large" in texts(outcome["too_big"])
    assert f"/tci/sessions/{session_id}/files/big.bin" in texts(outcome["too_big"])
    assert session_id in outcome["listed"]
    assert outcome["closed"].is_error is False
    assert outcome["gone"].is_error is True
    assert "session_not_found" in texts(outcome["gone"])


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(execute_timeout_seconds=20)


def test_mcp_in_process(settings: Settings) -> None:
    app = create_app(settings)
    endpoint: McpEndpoint = app.state.mcp

    async def scenario() -> dict[str, Any]:
        with endpoint.as_tenant("mcp-in-process"):
            async with Client(endpoint.server) as client:
                return await two_calls_in_one_session(client)

    with TestClient(app) as api:
        assert api.portal is not None
        check(api.portal.call(scenario))


def test_mcp_over_http_with_the_bearer_key(settings: Settings) -> None:
    with live_server(settings) as url:

        async def scenario() -> dict[str, Any]:
            http = httpx2.AsyncClient(headers=AUTH, timeout=60)
            async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
                return await two_calls_in_one_session(client)

        check(anyio.run(scenario))
        # No key: refused with the API's own error envelope before the MCP layer is reached.
        refused = httpx2.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
