"""Imports through held directories (``sandbox_runner.lookups``), each case in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Builds a package under ROOT, holds ROOT (the test trees are writable: no read-only check), and
# reports whether the import system was pointed at it.
_SETUP = """
import importlib, os, sys
from importlib import _bootstrap_external as external
from sandbox_runner import lookups
root = sys.argv[1]
os.makedirs(f"{root}/pkg/sub", exist_ok=True)
for path, text in {"pkg/__init__.py": "VALUE = 'pkg'", "pkg/sub/__init__.py": "", "pkg/sub/mod.py": "VALUE = 'mod'",
                   "pkg/data.txt": "payload"}.items():
    with open(f"{root}/{path}", "w") as handle:
        handle.write(text)
sys.path.insert(0, root)
held = lookups.install([root, "/no/such/directory"], require_read_only=False)
relative = []
def spying(function):
    def spy(path, *args, dir_fd=None, **kwargs):
        if dir_fd is not None:
            relative.append(path)
        return function(path, *args, dir_fd=dir_fd, **kwargs)
    return spy
lookups.posix = type(sys)("posix")
vars(lookups.posix).update(vars(os), stat=spying(os.stat), open=spying(os.open))
"""


def _run(tmp_path: Path, body: str) -> list[str]:
    script = _SETUP + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "tree")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_imports_from_a_held_tree_use_paths_relative_to_it(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
        import pkg.sub.mod
        import importlib.resources
        print(held, pkg.sub.mod.VALUE, pkg.sub.mod.__file__ == f"{root}/pkg/sub/mod.py")
        import pkgutil
        print(importlib.resources.files("pkg").joinpath("data.txt").read_text(), pkgutil.get_data("pkg", "data.txt"))
        print(any(p.endswith("pkg/sub/mod.py") for p in relative), "pkg/data.txt" in relative)
        """,
    )
    assert out == ["True", "mod", "True", "payload", "b'payload'", "True", "True"]


def test_errors_and_doubled_slashes_behave_as_with_plain_paths(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
        import pkgutil
        try:
            pkgutil.get_data("pkg", "missing.txt")
        except FileNotFoundError as exc:
            print(exc.filename == f"{root}/pkg/missing.txt")
        # The directory named with a doubled slash, not "/" (the descriptor is ignored for an absolute rest).
        print(sorted(external._os.listdir(root + "//")) == sorted(os.listdir(root)))
        print(external._path_stat(root + "//pkg").st_ino == os.stat(root + "/pkg").st_ino)
        """,
    )
    assert out == ["True", "True", "True"]


def test_a_closed_or_replaced_descriptor_falls_back_to_the_path(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
        import pkg
        (held_root,) = lookups._roots
        os.close(held_root.fd)
        other = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        os.dup2(other, held_root.fd)  # the same number, now another directory
        relative.clear()
        import pkg.sub.mod
        print(pkg.sub.mod.VALUE, relative == [], held_root.valid)
        """,
    )
    assert out == ["mod", "True", "False"]


def test_uninstall_restores_the_import_system(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
        import posix
        lookups.uninstall()
        print(external._path_stat.__module__ != "sandbox_runner.lookups", external._os is posix)
        import pkg.sub.mod
        print(pkg.sub.mod.VALUE, relative == [], lookups._roots == [])
        """,
    )
    assert out == ["True", "True", "mod", "True", "True"]


def test_a_writable_tree_is_not_held_by_default(tmp_path: Path) -> None:
    tree = tmp_path / "writable"
    tree.mkdir()
    script = "import sys\nfrom sandbox_runner import lookups\nprint(lookups.install([sys.argv[1]]))"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tree)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.split() == ["False"], done.stderr
