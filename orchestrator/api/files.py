"""File routes: a session's working directory, listed, downloaded, uploaded and deleted.

Thin HTTP over ``workspace.SessionFiles``; the rules and their reasons are documented there and in
the runner's ``workspace.py``.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.responses import StreamingResponse

from .. import workspace
from ..schemas import FileListResponse, FileWrittenResponse, rfc3339
from .deps import ServicesDep, TenantDep
from .responses import TCIJSONResponse
from .tci import ERRORS

_PathParam = Annotated[str, Path(description="Relative to the working directory.", examples=["plots/figure.png"])]
router = APIRouter(tags=["session files"], default_response_class=TCIJSONResponse)


class _AnyPathConvertor(PathConvertor):
    """Starlette's ``path``, newlines included: a file the session named with one is listed, so it must
    be reachable too (``.*`` alone stops at a newline)."""

    regex = "(?s:.*)"


register_url_convertor("anypath", _AnyPathConvertor())
_FILE_PATH = "/tci/sessions/{session_id}/files/{path:anypath}"
_RAW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _disposition(path: str) -> str:
    name = PurePosixPath(path).name or "download"
    ascii_name = name.encode("ascii", errors="replace").decode()
    # Control characters (a newline a session put in a name) would end the header line.
    fallback = "".join("_" if c in '"?\\' or not c.isprintable() else c for c in ascii_name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name)}"


@router.get(
    "/tci/sessions/{session_id}/files",
    responses={200: {"model": FileListResponse}, **ERRORS},
)
async def list_files(
    session_id: str,
    tenant: TenantDep,
    services: ServicesDep,
    path: Annotated[str, Query(max_length=1024, examples=["", "plots"])] = "",
) -> TCIJSONResponse:
    """List one directory of the session's working directory (`path` relative to it, empty: the top).

    Regular files and directories only; symlinks, FIFOs and devices are left out.
    """
    listing = await services.files.list(tenant, session_id, path)
    entries = [{**entry.model_dump(), "modified_at": rfc3339(entry.modified_at)} for entry in listing.entries]
    body = {"data": {"path": path, "entries": entries, "truncated": listing.truncated}, "errors": None}
    return TCIJSONResponse(body)


@router.get(
    _FILE_PATH,
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}, **ERRORS},
)
async def download_file(
    session_id: str, path: _PathParam, tenant: TenantDep, services: ServicesDep
) -> StreamingResponse:
    """Download a regular file (streamed; 413 over `ORCH_MAX_DOWNLOAD_BYTES`). Runs beside an execute."""
    download = await services.files.read(tenant, session_id, path)
    media_type = workspace.media_type(path)
    headers = {"content-length": str(download.size), "content-disposition": _disposition(path)}
    return StreamingResponse(download.chunks, media_type=media_type, headers=headers)


@router.put(_FILE_PATH, responses={200: {"model": FileWrittenResponse}, **ERRORS}, openapi_extra=_RAW_BODY)
async def upload_file(
    session_id: str, path: _PathParam, request: Request, tenant: TenantDep, services: ServicesDep
) -> TCIJSONResponse:
    """Upload the raw request body as a file: parents are created, an existing file is replaced
    atomically; same name rules and size limit as `files` in an execute.
    """
    content = await request.body()
    stored, size = await services.files.write(tenant, session_id, path, content)
    return TCIJSONResponse({"data": {"path": stored, "size": size}, "errors": None})


@router.delete(_FILE_PATH, status_code=204, responses=ERRORS)
async def delete_file(session_id: str, path: _PathParam, tenant: TenantDep, services: ServicesDep) -> Response:
    """Delete one file, symlink or directory tree."""
    await services.files.delete(tenant, session_id, path)
    return Response(status_code=204)
