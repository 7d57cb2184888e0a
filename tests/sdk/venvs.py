"""Create, or reuse, ``.venv-sdk/<version>/`` with ``together==<version>`` installed.

The two SDK generations install under the same package name, so each gets its own virtualenv.
A venv counts as ready only once ``.tci-sdk-ready`` records the version it was built for; a
half-built one (interrupted pip) is removed and built again. An exclusive file lock keeps two
pytest processes from building the same venv at once.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_ROOT = REPO_ROOT / ".venv-sdk"
READY_MARKER = ".tci-sdk-ready"
INSTALL_TIMEOUT = 900.0


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _is_ready(venv: Path, version: str) -> bool:
    marker = venv / READY_MARKER
    return marker.is_file() and marker.read_text().strip() == version and _python(venv).exists()


def _run(argv: list[str], log: Callable[[str], None]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    if done.returncode != 0:
        log(done.stdout[-4000:])
        log(done.stderr[-4000:])
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {done.returncode}:\n{done.stderr[-4000:]}")


def ensure_sdk_venv(version: str, log: Callable[[str], None] = print) -> Path:
    """The python of a virtualenv with exactly ``together==version``; built on first use."""
    venv = VENV_ROOT / version
    VENV_ROOT.mkdir(exist_ok=True)
    with open(VENV_ROOT / f".{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_ready(venv, version):
            return _python(venv)
        if venv.exists():
            log(f"[sdk] removing incomplete virtualenv {venv}")
            shutil.rmtree(venv)
        log(f"[sdk] creating {venv} (python -m venv) ...")
        _run([sys.executable, "-m", "venv", str(venv)], log)
        log(f"[sdk] pip install together=={version} into {venv} (first time only; this takes a while) ...")
        _run([str(_python(venv)), "-m", "pip", "install", "--quiet", f"together=={version}"], log)
        check = (
            "import importlib.metadata as m, sys; "
            f"sys.exit(0 if m.version('together') == {version!r} else 'together version mismatch')"
        )
        _run([str(_python(venv)), "-c", check], log)
        (venv / READY_MARKER).write_text(version + "\n")
        log(f"[sdk] together=={version} ready in {venv}")
        return _python(venv)
