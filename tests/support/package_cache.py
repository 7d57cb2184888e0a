"""The package cache as a child process for a test module, optionally behind a cuttable upstream proxy."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.package_cache import spawn
from orchestrator.settings import PackageCacheSettings


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (free unless someone races us for it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def package_cache(cache_dir: Path, *, https_proxy: str | None = None, index_ttl: int = 1800) -> Iterator[str]:
    """Run the cache on a free loopback port until the block ends; yields its URL."""
    settings = PackageCacheSettings(
        port=free_port(),
        cache_dir=cache_dir,
        index_ttl_seconds=index_ttl,
        # Behind an intercepting TLS proxy the host's bundle is what the upstream presents.
        upstream_ca_bundle=os.environ.get("PIP_CERT") or None,
    )
    env = dict(os.environ)
    if https_proxy is not None:
        env.update(HTTPS_PROXY=https_proxy, https_proxy=https_proxy, NO_PROXY="", no_proxy="")
    with spawn(settings, env=env, log_path=cache_dir.parent / f"package-cache-{settings.port}.log") as url:
        yield url
