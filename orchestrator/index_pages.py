"""Index pages trimmed to the files the asking pip could install.

pip reads every file a project's index page lists and checks each one against its interpreter's
tags: ujson's page lists 1,504 files, of which 60 could install in a sandbox, and reading and
checking the rest is most of what a cached install costs beyond pip's own start-up, install and
conflict check (bench figure 8b). pip names its interpreter in its User-Agent. For a CPython pip
on glibc Linux, the gate passes on a PEP 691 JSON page without the wheels that carry none of that
interpreter's tags and without the files pip never installs (Windows installers, eggs); sdists and
every other field stay. pip then chooses among exactly what it would have chosen among. Any other
client, page or doubt gets the page as the cache sent it.

What this gives up: ``pip download --platform … --python-version …`` for another platform sees
only this sandbox's files (it would find none to download).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

MEDIA_TYPE: Final = "application/vnd.pypi.simple.v1+json"
# The archives pip can install from besides wheels (pip's SUPPORTED_EXTENSIONS).
_SDIST_SUFFIXES: Final = (
    *(".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz"),
    *(".tar.xz", ".txz", ".tlz", ".tar.lz", ".tar.lzma"),
)
# What a sandbox's pip may claim to run on. The User-Agent is the sandbox's own to write: anything
# else gets the page as is (a glibc of 2.150000 would otherwise build 150,000 tags per request).
_ARCHES: Final = frozenset({"x86_64", "aarch64", "i686", "armv7l", "ppc64le", "ppc64", "s390x", "riscv64"})
_MAX_GLIBC_MINOR: Final = 99


@dataclass(frozen=True)
class Interpreter:
    """What pip's User-Agent says about the interpreter it installs for."""

    python: tuple[int, int]
    glibc: tuple[int, int]
    arch: str


def interpreter_of(user_agent: str | None) -> Interpreter | None:
    """The interpreter a CPython pip on glibc Linux runs on, else None (pure).

    pip sends ``pip/<version> {json}``, with ``implementation``, ``cpu`` and ``distro.libc``.
    """
    if not user_agent or not user_agent.startswith("pip/"):
        return None
    try:
        info = json.loads(user_agent.partition(" ")[2])
        implementation, libc, arch = info["implementation"], info["distro"]["libc"], info["cpu"]
        if implementation["name"] != "CPython" or libc["lib"] != "glibc" or arch not in _ARCHES:
            return None
        python = _major_minor(implementation["version"])
        glibc = _major_minor(libc["version"])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # a User-Agent is anyone's to write
        return None
    # Free-threaded builds (3.13t and later) have ABI tags the User-Agent does not tell apart, and
    # CPython before 3.8 had ABI flags (cp37m) that are not generated here.
    if python[0] != 3 or not 8 <= python[1] < 13 or glibc[0] != 2 or not 0 <= glibc[1] <= _MAX_GLIBC_MINOR:
        return None
    return Interpreter(python, glibc, arch)


def _major_minor(version: Any) -> tuple[int, int]:
    major, minor = str(version).split(".")[:2]
    return int(major), int(minor)


@functools.lru_cache(maxsize=32)
def supported_tags(interpreter: Interpreter) -> frozenset[Tag]:
    """Every tag that interpreter's pip accepts, and a few more (pure).

    As ``packaging.tags.sys_tags`` would compute it there, for a non-debug CPython: PEP 600's
    ``manylinux_2_<minor>`` down from the interpreter's glibc, the three legacy aliases, then
    ``linux_<arch>``. Extra tags only keep a file pip then skips; a missing one would hide a file.
    """
    arch = interpreter.arch
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(interpreter.glibc[1], -1, -1)]
    platforms += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]
    major, minor = interpreter.python
    abi = f"cp{major}{minor}"
    return frozenset(cpython_tags(interpreter.python, [abi], platforms)) | frozenset(
        compatible_tags(interpreter.python, abi, platforms)
    )


def installable(entry: dict[str, Any], tags: frozenset[Tag]) -> bool:
    """False only for a page entry pip would certainly not install with ``tags`` (pure)."""
    # pip names the file after its URL; ``filename`` is the same on PyPI, but the URL decides.
    url = entry.get("url")
    filename = unquote(urlsplit(url).path.rpartition("/")[2]) if isinstance(url, str) else entry.get("filename")
    if not isinstance(filename, str):
        return True
    if filename.endswith(".whl"):
        try:
            wheel_tags = parse_wheel_filename(filename)[3]
        except InvalidWheelFilename:
            return True  # pip's own reading decides
        return not wheel_tags.isdisjoint(tags)
    return filename.endswith(_SDIST_SUFFIXES)


def trim(page: bytes, interpreter: Interpreter) -> bytes | None:
    """The JSON page without the files ``interpreter`` cannot install; None to pass it on as is (pure)."""
    try:
        data = json.loads(page)
        files = data["files"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(files, list):
        return None
    tags = supported_tags(interpreter)
    kept = [entry for entry in files if not isinstance(entry, dict) or installable(entry, tags)]
    if len(kept) == len(files):
        return None
    data["files"] = kept
    return json.dumps(data, separators=(",", ":")).encode()
