"""JSON on the wire: one encoder for API responses and runner frames."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pydantic_core


def dump_json(value: Any, fallback: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON; ``fallback`` converts what JSON cannot hold (without it, that raises).

    pydantic-core's encoder is several times faster than the standard library's on megabytes of
    output; it refuses text that is not valid Unicode (lone surrogates, which code in a sandbox can
    print), so such text goes through the standard library with them replaced.
    """
    try:
        # NaN and Infinity are not JSON: null, as the standard library's parse of a runner frame gave.
        return pydantic_core.to_json(value, inf_nan_mode="null", fallback=fallback)
    except pydantic_core.PydanticSerializationError:
        return json.dumps(
            _without_nan(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=fallback
        ).encode("utf-8", errors="replace")


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value
