"""The JSON response class every route uses."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


class TCIJSONResponse(JSONResponse):
    """JSON that is always valid UTF-8: text from a sandbox may hold lone surrogates."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", errors="replace"
        )
