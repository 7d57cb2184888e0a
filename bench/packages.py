"""Figure 8: `!pip install` through the index gate, cold (the cache fetches upstream) and cached.

Each repetition starts a package cache on an empty directory, installs the same small packages in
one new session (cold: every file comes from the upstream index through the cache), then in
another (cached: nothing leaves this machine), then in a third from wheel files already inside the
sandbox with no index at all (pip's own time: the floor any cache can reach). The sessions exist
before the install. The install execute (`!pip install` alone) is what the figure times; the execute
after it imports every package to prove the install, and is timed apart: it compiles the new
modules from source (nothing is byte-compiled at install), which costs the same however the files
arrived. A server with installs off shows how fast pip says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from orchestrator.package_cache import spawn
from orchestrator.settings import PackageCacheSettings

from .api import client_for, close_session, execute, stdout_of
from .server import Server, free_port

PACKAGES = ("tabulate", "ujson", "termcolor", "toolz", "humanize", "emoji", "xmltodict", "sqlparse")
INSTALL = f"!pip install {' '.join(PACKAGES)}"
IMPORT = f"import {', '.join(PACKAGES)}\nprint('installed')"


# The floor: the same install from wheel files already in the sandbox, no index at all.
FETCH_WHEELS = f"!pip download -q --no-deps -d /tmp/wheels {' '.join(PACKAGES)}"
INSTALL_LOCAL = INSTALL.replace("!pip install ", "!pip install --no-index --find-links /tmp/wheels ", 1)


def _timed_install(server: Server, key: str, code: str = INSTALL, prepare: str = "print(1)") -> tuple[float, float]:
    """Seconds of the install execute, and of the import execute after it."""
    with client_for(server, key) as client:
        session_id = execute(client, prepare)["session_id"]
        # The pool refilling behind the claim would compete with pip for the CPU.
        server.wait_pool_full()
        began = time.perf_counter()
        installed = execute(client, code, session_id)
        middle = time.perf_counter()
        imported = execute(client, IMPORT, session_id)
        ended = time.perf_counter()
        close_session(client, session_id)
    if "Successfully installed" not in stdout_of(installed):
        raise RuntimeError(f"the install failed: {installed['outputs']}")
    if not stdout_of(imported).endswith("installed\n"):
        raise RuntimeError(f"the installed packages do not import: {imported['outputs']}")
    return middle - began, ended - middle


@contextlib.contextmanager
def package_cache(work_dir: Path) -> Iterator[str]:
    """A cache on an empty directory, trusting the build's CA bundle for the upstream (if any)."""
    cache_dir = work_dir / f"package-cache-{free_port()}"
    settings = PackageCacheSettings(
        port=free_port(), cache_dir=cache_dir, upstream_ca_bundle=os.environ.get("PIP_CERT") or None
    )
    try:
        with spawn(settings, log_path=work_dir / "package-cache.log") as url:
            yield url
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def install_latencies(
    start_server: Callable[[str, dict[str, str]], Server],
    stop_server: Callable[[Server], object],
    work_dir: Path,
    key: str,
    repetitions: int,
    progress: Callable[[str], None],
) -> dict[str, list[float]]:
    """Seconds of the same install, ``repetitions`` times, each on a fresh cache, by kind.

    Kinds: ``cold``, ``cached``, ``local`` (from wheel files already in the sandbox, no index: pip's
    own time, the floor of cached), and ``import`` (the execute importing the packages after each).
    """
    found: dict[str, list[float]] = {"cold": [], "cached": [], "local": [], "import": []}
    for index in range(repetitions):
        with package_cache(work_dir) as url:
            server = start_server(f"packages{index}", {"ORCH_PACKAGES__CACHE_URL": url})
            try:
                for kind, code, prepare in (
                    ("cold", INSTALL, "print(1)"),
                    ("cached", INSTALL, "print(1)"),
                    ("local", INSTALL_LOCAL, FETCH_WHEELS),
                ):
                    install, after = _timed_install(server, key, code, prepare)
                    found[kind].append(install)
                    found["import"].append(after)
            finally:
                stop_server(server)
        progress(
            f"install {index + 1}/{repetitions}: cold {found['cold'][-1]:.2f} s, cached {found['cached'][-1]:.2f} s, "
            f"from local wheels {found['local'][-1]:.2f} s; the import after each {found['import'][-1]:.2f} s"
        )
    return found


def disabled_latencies(server: Server, key: str, repetitions: int) -> list[float]:
    """Seconds for `!pip install` of a new package to fail on a server with installs off."""
    samples = []
    with client_for(server, key) as client:
        session_id = execute(client, "print(1)")["session_id"]
        for _ in range(repetitions):
            began = time.perf_counter()
            data = execute(client, "!pip install tabulate", session_id)
            samples.append(time.perf_counter() - began)
            if "package-installs-are-disabled-on-this-server" not in stdout_of(data):
                raise RuntimeError(f"pip did not say installs are off: {data['outputs']}")
        close_session(client, session_id)
    return samples
