"""The playground: one self-contained page (no build step, nothing fetched from elsewhere).

It uses the public API like any client: the key typed in is kept in the browser's local storage
and sent as the bearer key; nothing about it is trusted by the server.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["playground"])


@cache
def _page() -> str:
    return files("orchestrator").joinpath("playground/index.html").read_text(encoding="utf-8")


@router.get("/playground", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    """A web page to run cells in a session: streamed output, images, files, interrupt, close."""
    # The page's script is inline; forbid everything it does not need, including other origins.
    policy = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:"
    return HTMLResponse(_page(), headers={"content-security-policy": policy, "cache-control": "no-cache"})
