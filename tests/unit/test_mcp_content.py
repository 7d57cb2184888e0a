"""What ``execute_code`` gives a model for each kind of output (pure)."""

from __future__ import annotations

import base64

from mcp.types import ImageContent, TextContent

from orchestrator.api.mcp import execute_content
from orchestrator.models import ExecuteResult

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(300)).decode()


def test_each_kind_of_output() -> None:
    wrapped = base64.encodebytes(base64.b64decode(PNG)).decode()  # lines of 76 characters
    outputs = [
        {"type": "stdout", "data": "out\n"},
        {"type": "stderr", "data": "warn\n"},
        {"type": "display_data", "data": {"image/png": wrapped, "text/plain": "<Figure>"}},
        {"type": "display_data", "data": {"image/png": "@@not base64@@", "text/plain": "<Broken>"}},
        {"type": "display_data", "data": {"text/markdown": "# Title"}},
        {"type": "execute_result", "data": {"application/json": {"a": 1}}},
        {"type": "display_data", "data": {"application/vnd.custom": "x"}},
    ]
    content = execute_content(ExecuteResult(session_id="ses_x", outputs=outputs))
    assert isinstance(content[2], ImageContent)
    assert (content[2].data, content[2].mime_type) == (PNG, "image/png")
    texts = [block.text for block in content if isinstance(block, TextContent)]
    assert texts == [
        "out\n",
        "[stderr]\nwarn\n",
        "<Broken>",
        "[text/markdown]\n# Title",
        '[application/json]\n{"a": 1}',
        "[a display of application/vnd.custom, with no text form]",
        "session_id: ses_x (outcome: ok)",
    ]
