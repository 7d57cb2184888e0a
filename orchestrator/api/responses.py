"""The JSON response class every route uses."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from ..wire import dump_json


class TCIJSONResponse(JSONResponse):
    """JSON that is always valid UTF-8: text from a sandbox may hold lone surrogates."""

    def render(self, content: Any) -> bytes:
        return dump_json(content)
