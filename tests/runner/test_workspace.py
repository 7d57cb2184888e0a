"""The runner's file ops on a real directory: the path rules, special files, chunked reads, atomic writes."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox_runner import workspace
from sandbox_runner.config import Limits
from sandbox_runner.workspace import WorkspaceRefused

LIMITS = Limits(max_file_bytes=1000)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    work = tmp_path / "workspace"
    work.mkdir()
    (tmp_path / "secret").write_text("outside")
    return work


def refused(code: str, call: Callable[..., object], *args: object) -> str:
    with pytest.raises(WorkspaceRefused) as caught:
        call(*args)
    assert caught.value.code == code
    return str(caught.value)


def test_write_read_list_delete(root: Path) -> None:
    content = base64.b64encode(bytes(range(256)) * 3).decode()
    assert workspace.write_file(root, "a/b/c.bin", content, LIMITS) == {"path": "a/b/c.bin", "size": 768}
    assert sorted(os.listdir(root / "a" / "b")) == ["c.bin"]  # no temporary file left behind
    first = workspace.read_chunk(root, "a/b/c.bin", LIMITS, 0, 500, 1000)
    rest = workspace.read_chunk(root, "a/b/c.bin", LIMITS, 500, 500, 1000)
    assert (first["eof"], rest["eof"], first["size"]) == (False, True, 768)
    assert base64.b64decode(first["content"]) + base64.b64decode(rest["content"]) == bytes(range(256)) * 3
    listing = workspace.list_dir(root, "", LIMITS)
    assert [(e["path"], e["type"], e["size"]) for e in listing["entries"]] == [("a", "directory", 0)]
    assert workspace.list_dir(root, "a/b", LIMITS)["entries"][0]["path"] == "a/b/c.bin"
    assert workspace.list_dir(root, "a/b/", LIMITS)["entries"][0]["path"] == "a/b/c.bin"
    workspace.delete(root, "a", LIMITS)
    assert not (root / "a").exists()
    refused("file_not_found", workspace.read_chunk, root, "a/b/c.bin", LIMITS, 0, 1, 1000)


def test_paths_never_leave_the_working_directory(root: Path) -> None:
    os.symlink(root.parent, root / "up")
    os.symlink(root.parent / "secret", root / "secret-link")
    for name in ("../secret", "/etc/passwd", "up/secret", "secret-link", "a/../../secret"):
        refused("invalid_file", workspace.read_chunk, root, name, LIMITS, 0, 10, 1000)
    refused("invalid_file", workspace.list_dir, root, "up", LIMITS)
    refused("invalid_file", workspace.write_file, root, "up/new", "eA==", LIMITS)
    assert not (root.parent / "new").exists()
    # Deleting a link removes the link, never what it points at.
    workspace.delete(root, "secret-link", LIMITS)
    assert (root.parent / "secret").read_text() == "outside"
    refused("invalid_file", workspace.delete, root, "up/secret", LIMITS)


def test_a_loop_of_symlinks_is_refused(root: Path) -> None:
    """Code can make one; following it must be a refusal, not an error of the runner's."""
    os.symlink("lp2", root / "lp1")
    os.symlink("lp1", root / "lp2")
    for name in ("lp1", "lp1/x"):
        assert "loop" in refused("invalid_file", workspace.read_chunk, root, name, LIMITS, 0, 10, 1000)
        refused("invalid_file", workspace.list_dir, root, name, LIMITS)
        refused("invalid_file", workspace.write_file, root, name, "eA==", LIMITS)
    refused("invalid_file", workspace.delete, root, "lp1/x", LIMITS)
    workspace.delete(root, "lp1", LIMITS)  # the link itself can go
    assert not os.path.lexists(root / "lp1")


def test_special_files_and_limits(root: Path) -> None:
    os.mkfifo(root / "pipe")
    (root / "dir").mkdir()
    (root / "big").write_bytes(b"x" * 2000)
    assert "regular file" in refused("invalid_file", workspace.read_chunk, root, "pipe", LIMITS, 0, 10, 1000)
    refused("invalid_file", workspace.read_chunk, root, "dir", LIMITS, 0, 10, 1000)
    assert "download limit" in refused("file_too_large", workspace.read_chunk, root, "big", LIMITS, 0, 10, 1000)
    assert "pipe" not in {e["name"] for e in workspace.list_dir(root, "", LIMITS)["entries"]}
    too_big = base64.b64encode(b"x" * 1001).decode()
    refused("file_too_large", workspace.write_file, root, "upload", too_big, LIMITS)
    refused("invalid_file", workspace.write_file, root, "dir", "eA==", LIMITS)
    refused("invalid_file", workspace.write_file, root, "big/under", "eA==", LIMITS)
