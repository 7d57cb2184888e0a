"""The working directory seen from outside: list, read in chunks, write and delete, never outside it.

Paths follow the same rules as uploaded ``files`` (``files.check_name``) and must resolve inside
the working directory, through symlinks too. Only regular files are read: a FIFO or a device
node the session made would block or never end. None of this waits for a running execute.
"""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Final

from .config import Limits
from .files import FileRejected, check_destinations, check_name, followed, prepare_files, write_files

# Entries returned by one listing; a directory with more says ``truncated``.
MAX_ENTRIES: Final = 10_000


class WorkspaceRefused(Exception):
    """A file request that cannot be carried out; ``code`` is the protocol's refusal code."""

    def __init__(self, code: str, message: str, param: str | None = "path") -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def _inside(root: Path, path: Path) -> bool:
    real_root = root.resolve()
    return path == real_root or real_root in path.parents


def resolve_path(root: Path, name: Any, limits: Limits, *, root_allowed: bool = False, entry: bool = False) -> Path:
    """``root / name`` after the name rules, refused when it resolves outside ``root``.

    With ``entry``, a final symlink is the entry itself (to delete it): only its directory must be inside.
    """
    if root_allowed and name in {None, "", ".", "/"}:
        return root.resolve()
    try:
        relative = check_name(name, "path", limits)
    except FileRejected as exc:
        raise WorkspaceRefused("invalid_file", str(exc).replace("file name", "path")) from exc
    target = root / relative
    if not _inside(root, _real(target.parent) / target.name if entry else _real(target)):
        raise WorkspaceRefused("invalid_file", "path resolves outside the working directory")
    return target


def _real(path: Path) -> Path:
    """``path`` with its symlinks followed; refused when they form a loop (code may make one any time)."""
    real = followed(path)
    if real is None:
        raise WorkspaceRefused("invalid_file", "path passes through a loop of symbolic links")
    return real


def _missing(name: Any) -> WorkspaceRefused:
    return WorkspaceRefused("file_not_found", f"no such file or directory: {name}")


def list_dir(root: Path, name: Any, limits: Limits) -> dict[str, Any]:
    """Regular files and directories in one directory (symlinks, FIFOs and devices are left out)."""
    if isinstance(name, str) and name.strip("/") and not name.startswith("/"):
        name = name.rstrip("/")  # "plots/" names a directory as well as "plots" does
    directory = _real(resolve_path(root, name, limits, root_allowed=True))
    real_root = root.resolve()
    if not directory.exists():
        raise _missing(name)
    if not directory.is_dir():
        raise WorkspaceRefused("invalid_file", "path is not a directory")
    entries: list[dict[str, Any]] = []
    truncated = False
    with os.scandir(directory) as scan:
        for entry in scan:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                kind, size = "directory", 0
            elif stat.S_ISREG(info.st_mode):
                kind, size = "file", info.st_size
            else:
                continue
            if len(entries) >= MAX_ENTRIES:
                truncated = True
                break
            entries.append(
                {
                    "name": entry.name,
                    "path": Path(entry.path).relative_to(real_root).as_posix(),
                    "type": kind,
                    "size": size,
                    "modified_at": info.st_mtime,
                }
            )
    entries.sort(key=lambda item: item["name"])
    return {"entries": entries, "truncated": truncated}


def read_chunk(root: Path, name: Any, limits: Limits, offset: int, length: int, max_bytes: int) -> dict[str, Any]:
    """``length`` bytes from ``offset`` of a regular file, base64, with its size and mtime."""
    target = _real(resolve_path(root, name, limits))
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused below like any non-regular file.
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise _missing(name) from exc
    except IsADirectoryError as exc:
        raise WorkspaceRefused("invalid_file", "path is a directory") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise WorkspaceRefused("invalid_file", "path is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise WorkspaceRefused("invalid_file", "path is not a regular file (a device, FIFO or socket)")
        if info.st_size > max_bytes:
            raise WorkspaceRefused(
                "file_too_large", f"file is {info.st_size} bytes, over the {max_bytes}-byte download limit"
            )
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    return {
        "content": base64.b64encode(data).decode("ascii"),
        "size": info.st_size,
        "modified_at": info.st_mtime,
        "eof": offset + len(data) >= info.st_size or not data,
    }


def write_file(root: Path, name: Any, content: Any, limits: Limits) -> dict[str, Any]:
    """Write one file with the rules and the atomic replace of uploaded ``files``."""
    if not isinstance(content, str):
        raise WorkspaceRefused("bad_request", "content must be base64 text", "content")
    # base64 is 4 characters per 3 bytes: refuse an oversize upload before decoding it.
    if (len(content) // 4) * 3 > limits.max_file_bytes + 3:
        raise WorkspaceRefused("file_too_large", f"file is over the {limits.max_file_bytes}-byte upload limit")
    resolve_path(root, name, limits)
    try:
        prepared = prepare_files([{"name": name, "content": content, "encoding": "base64"}], limits)
        check_destinations(root, prepared)
    except FileRejected as exc:
        too_large = exc.param.endswith(".content") and "bytes" in str(exc)
        raise WorkspaceRefused("file_too_large" if too_large else "invalid_file", str(exc)) from exc
    write_files(root, prepared)
    return {"path": prepared[0].path.as_posix(), "size": len(prepared[0].content)}


def delete(root: Path, name: Any, limits: Limits) -> dict[str, Any]:
    """Remove one file, symlink (not its target) or directory tree."""
    target = resolve_path(root, name, limits, entry=True)
    try:
        info = target.lstat()
    except FileNotFoundError as exc:
        raise _missing(name) from exc
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(target)
    else:
        target.unlink()
    return {}
