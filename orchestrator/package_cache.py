"""``python -m orchestrator.package_cache``: the shared PyPI cache behind every sandbox's index gate.

The cache is proxpi (a well-kept caching mirror of the simple API: index pages cached for a TTL,
files kept on disk up to a size, least used evicted first, hashes passed through so pip checks
every file), served by gunicorn's threaded worker. What this module adds:

- configuration from the orchestrator's settings (``ORCH_PACKAGE_CACHE__*``): proxpi reads its
  own variables when it is imported, so they are set first;
- the extra CA bundle appended to certifi's, so a corporate TLS proxy is trusted in addition to
  the public CAs rather than instead of them;
- upstream credentials put into the index URL here, in this process only; sandboxes never see
  them (nor this process: they reach it only through the gate);
- index pages served stale when the upstream fails: proxpi otherwise answers 500 once a page's
  TTL has passed, and installs of cached packages would stop working during an outage.

Only the gate talks to this process; keep it off any network a sandbox or a user can reach.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .settings import PackageCacheSettings, Settings

log = logging.getLogger("orchestrator.package_cache")


def upstream_url(settings: PackageCacheSettings) -> str:
    """The upstream index URL with its credentials, if any (pure)."""
    password = (
        settings.upstream_password_file.read_text().strip()
        if settings.upstream_password_file is not None
        else settings.upstream_password.get_secret_value()
        if settings.upstream_password is not None
        else None
    )
    if settings.upstream_username is None and password is None:
        return settings.upstream_url
    parts = urllib.parse.urlsplit(settings.upstream_url)
    userinfo = urllib.parse.quote(settings.upstream_username or "", safe="")
    if password is not None:
        userinfo += ":" + urllib.parse.quote(password, safe="")
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def proxpi_environment(settings: PackageCacheSettings, ca_bundle: Path | None) -> dict[str, str]:
    """proxpi's variables for these settings (pure)."""
    env = {
        "PROXPI_INDEX_URL": upstream_url(settings),
        "PROXPI_INDEX_TTL": str(settings.index_ttl_seconds),
        "PROXPI_CACHE_DIR": str(settings.cache_dir),
        "PROXPI_CACHE_SIZE": str(settings.cache_bytes),
        # Wait for a cold file instead of redirecting pip to the origin, which a sandbox cannot reach.
        "PROXPI_DOWNLOAD_TIMEOUT": str(settings.download_timeout_seconds),
        "PROXPI_CONNECT_TIMEOUT": "10",
        "PROXPI_READ_TIMEOUT": "30",
        "PROXPI_BINARY_FILE_MIME_TYPE": "1",
    }
    if ca_bundle is not None:
        env["REQUESTS_CA_BUNDLE"] = str(ca_bundle)
    return env


def merged_ca_bundle(extra: Path, directory: Path) -> Path:
    """certifi's CAs plus ``extra``, written to a file in ``directory``."""
    import certifi

    merged = directory / "upstream-ca.pem"
    merged.write_text(Path(certifi.where()).read_text() + "\n" + extra.read_text())
    return merged


def load_app(settings: PackageCacheSettings) -> Any:
    """Configure and import proxpi; returns its WSGI app."""
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    ca_bundle = None
    if settings.upstream_ca_bundle is not None:
        ca_bundle = merged_ca_bundle(settings.upstream_ca_bundle, Path(tempfile.mkdtemp(prefix="tci-package-cache-")))
    os.environ.update(proxpi_environment(settings, ca_bundle))

    import requests
    from proxpi import _cache

    class StaleOnErrorIndexCache(_cache._IndexCache):  # type: ignore[misc]
        """Keeps serving a project's last good page while the upstream cannot be reached."""

        def _list_files(self, package_name: str) -> None:
            try:
                super()._list_files(package_name)
            except (requests.RequestException, _cache.NotFound) as exc:
                if package_name not in self._packages:
                    raise
                log.warning("upstream failed, serving the cached page of %s: %r", package_name, exc)

        def list_projects(self) -> frozenset[str]:
            # proxpi looks a project up in the whole project list (tens of MB) when its page is
            # missing, to resolve unnormalised names; the gate only lets normalised ones through,
            # so a missing page means a missing project, answered at once.
            return frozenset()

    _cache.Cache._index_cache_cls = StaleOnErrorIndexCache
    from proxpi.server import app

    return app


def settings_environment(settings: PackageCacheSettings) -> dict[str, str]:
    """``ORCH_PACKAGE_CACHE__*`` variables that reproduce ``settings`` in another process (pure)."""
    env = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        secret = getattr(settings, name)
        env[f"ORCH_PACKAGE_CACHE__{name.upper()}"] = (
            secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(value)
        )
    return env


@contextlib.contextmanager
def spawn(
    settings: PackageCacheSettings, *, env: Mapping[str, str] | None = None, log_path: Path | None = None
) -> Iterator[str]:
    """Run the cache as a child process until the block ends; yields its URL once it answers.

    ``env`` is the child's environment (default: this process's, without other ``ORCH_``
    settings); ``log_path`` receives its output.

    Raises:
        RuntimeError: it exited or did not answer within 30 s.
    """
    base = dict(os.environ if env is None else env)
    child_env = {k: v for k, v in base.items() if not k.startswith("ORCH_")} | settings_environment(settings)
    url = f"http://{settings.host}:{settings.port}"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log_path.open("ab")) if log_path is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.package_cache"], env=child_env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2):  # noqa: S310 - our own URL
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the package cache did not start (log: {log_path})") from None
                    time.sleep(0.1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> None:
    """Serve the cache with gunicorn (one process: proxpi's index cache lives in memory)."""
    from gunicorn.app.base import BaseApplication

    settings = Settings().package_cache
    parser = argparse.ArgumentParser(prog="python -m orchestrator.package_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("workers", 1)
            self.cfg.set("threads", settings.threads)
            self.cfg.set("timeout", int(settings.download_timeout_seconds) + 30)
            self.cfg.set("accesslog", None)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 24: nothing to control here
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            return load_app(settings)

    Server().run()


if __name__ == "__main__":
    main()
