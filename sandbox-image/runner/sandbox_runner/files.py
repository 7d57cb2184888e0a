"""Uploaded files: validated all together first, then written into the working directory.

A request whose files are not all acceptable writes nothing and runs nothing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .config import Limits


class FileRejected(ValueError):
    """One uploaded file cannot be accepted; ``param`` names it (``files[2].name``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class PreparedFile:
    """A validated upload: a relative path and its decoded bytes."""

    path: PurePosixPath
    content: bytes


def check_name(name: Any, param: str, limits: Limits) -> PurePosixPath:
    """A safe relative path for ``name``, or ``FileRejected`` naming ``param``."""
    if not isinstance(name, str) or not name:
        raise FileRejected("file name must be a non-empty string", param)
    if "\x00" in name:
        raise FileRejected("file name must not contain NUL bytes", param)
    encoded = name.encode("utf-8", errors="replace")
    if len(encoded) > limits.max_path_bytes:
        raise FileRejected(f"file name is longer than {limits.max_path_bytes} bytes", param)
    if name.startswith("/") or name.startswith("\\"):
        raise FileRejected("file name must be relative to the working directory", param)
    path = PurePosixPath(name)
    parts = path.parts
    if any(part == ".." for part in parts):
        raise FileRejected("file name must not contain '..'", param)
    if not parts or all(part == "." for part in parts) or name.endswith("/"):
        raise FileRejected("file name must name a file", param)
    for part in parts:
        if len(part.encode("utf-8", errors="replace")) > limits.max_name_bytes:
            raise FileRejected(f"a file name component is longer than {limits.max_name_bytes} bytes", param)
    return PurePosixPath(*(part for part in parts if part != "."))


def _decode(item: dict[str, Any], index: int) -> bytes:
    encoding = item.get("encoding", "string")
    content = item.get("content")
    if not isinstance(content, str):
        raise FileRejected("file content must be a string", f"files[{index}].content")
    if encoding == "string":
        return content.encode("utf-8", errors="surrogateescape")
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FileRejected(f"file content is not valid base64: {exc}", f"files[{index}].content") from exc
    raise FileRejected("file encoding must be 'string' or 'base64'", f"files[{index}].encoding")


def prepare_files(files: Any, limits: Limits) -> list[PreparedFile]:
    """Validate every upload; raise ``FileRejected`` for the first bad one."""
    if files is None:
        return []
    if not isinstance(files, list):
        raise FileRejected("files must be a list", "files")
    if len(files) > limits.max_files:
        raise FileRejected(f"at most {limits.max_files} files per request", "files")
    prepared: list[PreparedFile] = []
    total = 0
    seen: set[PurePosixPath] = set()
    for index, item in enumerate(files):
        if not isinstance(item, dict):
            raise FileRejected("each file must be an object", f"files[{index}]")
        path = check_name(item.get("name"), f"files[{index}].name", limits)
        content = _decode(item, index)
        if len(content) > limits.max_file_bytes:
            raise FileRejected(
                f"file is {len(content)} bytes, over the {limits.max_file_bytes}-byte cap", f"files[{index}].content"
            )
        total += len(content)
        if total > limits.max_files_bytes:
            raise FileRejected(f"files add up to more than {limits.max_files_bytes} bytes", "files")
        if path in seen:
            raise FileRejected("the same file name appears twice", f"files[{index}].name")
        seen.add(path)
        prepared.append(PreparedFile(path, content))
    return prepared


def followed(path: Path) -> Path | None:
    """``path`` with every symlink followed, or None when they form a loop (code can make one)."""
    try:
        return path.resolve()
    except RuntimeError:  # "Symlink loop from ...": what resolve() raises for a loop on Python 3.11
        return None


def check_destinations(root: Path, files: list[PreparedFile]) -> None:
    """Refuse destinations that cannot be written as plain files, so that a request writes all or nothing.

    A path may not leave ``root`` through a symlink the session created, replace a directory or a
    symlink (``write_files`` does not follow one), or pass through a file, existing or uploaded.
    """
    real_root = root.resolve()
    uploaded = {item.path for item in files}
    for index, item in enumerate(files):
        param = f"files[{index}].name"
        target = root / item.path
        resolved = followed(target)
        if resolved is None:
            raise FileRejected("file name passes through a loop of symbolic links", param)
        if resolved != real_root and real_root not in resolved.parents:
            raise FileRejected("file name resolves outside the working directory", param)
        if target.is_symlink():
            raise FileRejected("file name is an existing symbolic link", param)
        if resolved.is_dir():
            raise FileRejected("file name is an existing directory", param)
        for parent in item.path.parents:
            if parent in uploaded or ((root / parent).exists() and not (root / parent).is_dir()):
                raise FileRejected(f"file name needs '{parent}' to be a directory, but it is a file", param)


def write_files(root: Path, files: list[PreparedFile]) -> None:
    """Write validated files; parents are created, existing files replaced."""
    for item in files:
        target = root / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed into place: code running meanwhile (an upload through the file
        # routes does not wait for an execute) reads the old file or the new one, never half of one.
        # O_EXCL | O_NOFOLLOW: a symlink swapped in after the check is refused rather than followed.
        temp = target.with_name(f".tci-upload-{os.urandom(6).hex()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(item.content)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
