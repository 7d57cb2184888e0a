"""Figure 8: `!pip install` through the index gate, cold (the cache fetches upstream) and cached.

Each repetition starts a package cache on an empty directory, installs the same small packages in
one new session (cold: every file comes from the upstream index through the cache) and then in
another (cached: nothing leaves this machine). Only the install execute is timed; the sessions
exist before it. A server with installs turned off shows how fast pip says so.
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

from .api import client_for, close_session, execute
from .server import Server, free_port

PACKAGES = ("tabulate", "ujson", "termcolor", "toolz", "humanize")
INSTALL = f"!pip install {' '.join(PACKAGES)}\nimport {', '.join(PACKAGES)}\nprint('installed')"


def _timed_install(server: Server, key: str) -> float:
    with client_for(server, key) as client:
        session_id = execute(client, "print(1)")["session_id"]
        began = time.perf_counter()
        data = execute(client, INSTALL, session_id)
        elapsed = time.perf_counter() - began
        close_session(client, session_id)
    stdout = "".join(o["data"] for o in data["outputs"] if o["type"] == "stdout")
    if not stdout.endswith("installed\n"):
        raise RuntimeError(f"the install failed: {data['outputs']}")
    return elapsed


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
) -> tuple[list[float], list[float]]:
    """(cold, cached) seconds of the same install, ``repetitions`` pairs, each on a fresh cache."""
    cold: list[float] = []
    cached: list[float] = []
    for index in range(repetitions):
        with package_cache(work_dir) as url:
            server = start_server(f"packages{index}", {"ORCH_PACKAGES__CACHE_URL": url})
            try:
                cold.append(_timed_install(server, key))
                cached.append(_timed_install(server, key))
            finally:
                stop_server(server)
        progress(f"install {index + 1}/{repetitions}: cold {cold[-1]:.2f} s, cached {cached[-1]:.2f} s")
    return cold, cached


def disabled_latencies(server: Server, key: str, repetitions: int) -> list[float]:
    """Seconds for `!pip install` of a new package to fail on a server with installs off."""
    samples = []
    with client_for(server, key) as client:
        session_id = execute(client, "print(1)")["session_id"]
        for _ in range(repetitions):
            began = time.perf_counter()
            data = execute(client, "!pip install tabulate", session_id)
            samples.append(time.perf_counter() - began)
            stdout = "".join(o["data"] for o in data["outputs"] if o["type"] == "stdout")
            if "package-installs-are-disabled-on-this-server" not in stdout:
                raise RuntimeError(f"pip did not say installs are off: {data['outputs']}")
        close_session(client, session_id)
    return samples
