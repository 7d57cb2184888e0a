"""Imports from the image's read-only Python trees without walking every path from ``/``.

On some engines (fuse-overlayfs, Docker's driver where the kernel's overlayfs is not available) a
container's root is a FUSE file system whose entries the kernel asks the FUSE daemon about again on
every lookup: each absolute path costs a round trip to that daemon (about 50 us, measured), however
deep the rest of the path lies on a faster mount. An import makes about four such lookups per
module (the directory's mtime, the file, the source's stat, the cached bytecode), so ``import
pandas`` spent about a quarter of its time there.

The interpreter's own import system (``importlib._bootstrap_external``) is pointed at directory
descriptors held on the standard library and the virtualenv: a lookup under one of them is made
relative to the descriptor (``dir_fd``), which starts the walk past ``/``. Only read-only trees are
held, so what a path names there cannot change; a descriptor that user code closed or replaced is
noticed (its identity is checked on every use) and the plain path is used from then on; a lookup that
fails raises the error the plain path would have, naming the absolute path. Nothing else changes:
``__file__``, ``sys.path`` and tracebacks keep their absolute paths; audit hooks see the relative
path of an ``open``.

Loaded from a ``.pth`` file of the image's virtualenv, so every Python process there (the runner,
the interpreter, ``!pip``, a user's ``python script.py``) gets it at start-up. ``python -S`` or
``-I`` does not, and imports the slow way.
"""

from __future__ import annotations

import fcntl
import os
import posix
import sys
from importlib import _bootstrap_external

# Every Python process in the sandbox imports this at start-up: typing's own import would cost more
# than this module saves a small script.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, Final

# Its private functions are what this replaces: typed loosely on purpose.
_external: Any = _bootstrap_external

# The image's Python trees (also its library-volume paths); the user site is writable, so never held.
ROOTS: Final = ("/usr/lib/python3.11", "/opt/venv")
# Held descriptors sit above the numbers user code is likely to close or reuse.
_FD_FLOOR: Final = 512


class _Root:
    """A directory held open, and the identity it must still have to be used."""

    def __init__(self, path: str, fd: int) -> None:
        self.prefix = path.rstrip("/") + "/"
        self.fd = fd
        status = os.fstat(fd)
        self.identity = (status.st_dev, status.st_ino)
        self.valid = True

    def check(self) -> bool:
        """Whether the descriptor still names this directory (user code may have closed or replaced it)."""
        if self.valid:
            try:
                status = os.fstat(self.fd)
                self.valid = (status.st_dev, status.st_ino) == self.identity
            except OSError:
                self.valid = False
        return self.valid


_roots: list[_Root] = []
_saved: dict[str, Any] = {}


def _relative(path: Any) -> tuple[str, int] | None:
    """(path relative to a held root, its descriptor) when ``path`` lies under one that is still good."""
    if type(path) is not str or not path.startswith("/"):
        return None
    for root in _roots:
        if path.startswith(root.prefix) and root.check():
            rest = path[len(root.prefix) :]
            # "/opt/venv//lib": a rest that is absolute would ignore the descriptor.
            return None if rest.startswith("/") else (rest or ".", root.fd)
    return None


# A lookup that fails raises what the plain path would have (the same error, naming the absolute
# path) without trying that path too: misses are common (a package's __init__ is looked for as an
# extension module first) and each would cost the round trip this module avoids.


def _path_stat(path: str) -> os.stat_result:
    found = _relative(path)
    if found is None:
        return posix.stat(path)
    try:
        return posix.stat(found[0], dir_fd=found[1])
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


def _listdir(path: Any = None) -> list[str]:
    found = _relative(path)
    if found is None:
        return posix.listdir(path) if path is not None else posix.listdir()
    try:
        fd = posix.open(found[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=found[1])
        try:
            return posix.listdir(fd)
        finally:
            posix.close(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None


def _get_data(original: Callable[[Any, Any], bytes]) -> Callable[[Any, Any], bytes]:
    def get_data(self: Any, path: Any) -> bytes:
        found = _relative(path)
        if found is None:
            return original(self, path)
        try:
            fd = posix.open(found[0], os.O_RDONLY | os.O_CLOEXEC, dir_fd=found[1])
            with open(fd, "rb", buffering=0, closefd=True) as file:
                return file.read()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None

    return get_data


def _read_only(fd: int) -> bool:
    return bool(os.fstatvfs(fd).f_flag & os.ST_RDONLY)


def install(roots: Iterable[str] = ROOTS, *, require_read_only: bool = True) -> bool:
    """Hold ``roots`` (those that exist, read-only unless told otherwise) and route imports through them.

    True when at least one root is held. Never raises: without it imports work as before.
    """
    if _saved:
        return bool(_roots)
    try:
        for path in roots:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if require_read_only and not _read_only(fd):
                    continue
                _roots.append(_Root(path, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FD_FLOOR)))
            finally:
                os.close(fd)
        if not _roots:
            return False
        _saved.update(path_stat=_external._path_stat, os=_external._os, get_data=_external.FileLoader.get_data)
        # The import system's view of the os module (posix): the same functions, but for listdir.
        view = type(sys)("posix")
        vars(view).update(vars(_saved["os"]), listdir=_listdir)
        _external._os = view
        _external._path_stat = _path_stat
        _external.FileLoader.get_data = _get_data(_saved["get_data"])
        return True
    except Exception:  # noqa: BLE001 - a start-up hook must never stop Python from starting
        uninstall()
        return False


def uninstall() -> None:
    """Put the import system back as it was and let go of the held directories."""
    if _saved:
        _external._path_stat = _saved["path_stat"]
        _external._os = _saved["os"]
        _external.FileLoader.get_data = _saved["get_data"]
        _saved.clear()
    for root in _roots:
        if root.check():
            os.close(root.fd)
    _roots.clear()
