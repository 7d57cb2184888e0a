"""Start ``python -m orchestrator.package_cache`` as a child process for a test run or a benchmark."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def package_cache(cache_dir: Path, *, https_proxy: str | None = None, index_ttl: int = 1800) -> Iterator[str]:
    """Run the cache on a free loopback port until the block ends; yields its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update(
        ORCH_PACKAGE_CACHE__HOST="127.0.0.1",
        ORCH_PACKAGE_CACHE__PORT=str(port),
        ORCH_PACKAGE_CACHE__CACHE_DIR=str(cache_dir),
        ORCH_PACKAGE_CACHE__INDEX_TTL_SECONDS=str(index_ttl),
    )
    # Behind an intercepting TLS proxy the host's bundle is what the upstream presents.
    if os.environ.get("PIP_CERT"):
        env["ORCH_PACKAGE_CACHE__UPSTREAM_CA_BUNDLE"] = os.environ["PIP_CERT"]
    if https_proxy is not None:
        env.update(HTTPS_PROXY=https_proxy, https_proxy=https_proxy, NO_PROXY="", no_proxy="")
    log = (cache_dir.parent / f"package-cache-{port}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.package_cache"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the package cache did not start; see {log.name}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
