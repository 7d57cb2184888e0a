"""Orchestrator servers as subprocesses (``python -m orchestrator``) on free loopback ports.

Each server gets its own ``ORCH_INSTANCE`` (so no server adopts or reaps another's containers)
and the run's ``ORCH_TEST_RUN_LABEL`` (so cleanup finds every container any of them made). The
caller's own ``ORCH_*`` variables are dropped: a benchmark must not depend on the shell it runs in.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .interrupt import checkpoint
from .progress import say

_READY_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0
_METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (free unless someone races us for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def auth(key: str) -> dict[str, str]:
    """Headers for API key ``key`` (dev mode: every key is its own tenant)."""
    return {"Authorization": f"Bearer {key}"}


class Server:
    """One orchestrator subprocess; ``start`` returns once ``/readyz`` says ready."""

    def __init__(
        self, name: str, *, run_id: str, log_dir: Path, socket_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self._socket_dir = socket_dir
        self.instance = f"{run_id}-{name}"
        self._run_id = run_id
        self._log_path = log_dir / f"server-{name}.log"
        self._overrides = env or {}
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Spawn the server and wait for readiness (raises with the log's tail if it dies)."""
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("ORCH_")}
        env.update(
            {
                "ORCH_INSTANCE": self.instance,
                "ORCH_TEST_RUN_LABEL": self._run_id,
                "ORCH_LOG_FORMAT": "json",
                "ORCH_SOCKET_DIR": str(self._socket_dir),
                **self._overrides,
            }
        )
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log:
            # A session of its own: Ctrl-C reaches only the benchmark, which then stops us in order.
            self._process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        say(f"server {self.name}: pid {self._process.pid} on port {self.port} ({self._describe()})")
        deadline = time.monotonic() + _READY_TIMEOUT
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while True:
                checkpoint()
                if self._process.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited ({self._process.returncode}):\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {self.name} not ready after {_READY_TIMEOUT:g} s:\n{self.log_tail()}")
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The server process's id (it must be running)."""
        assert self._process is not None
        return self._process.pid

    def _describe(self) -> str:
        pairs = sorted(self._overrides.items())
        return ", ".join(f"{key.removeprefix('ORCH_').lower()}={value}" for key, value in pairs) or "defaults"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period. The orchestrator leaves its containers running."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- observations ------------------------------------------------------------------------

    def readyz(self) -> dict[str, Any]:
        response = httpx.get(f"{self.base_url}/readyz", timeout=10)
        body: dict[str, Any] = response.json()
        return body

    def pool_ready(self) -> tuple[int, int]:
        """(ready, target) of the warm pool."""
        pool = self.readyz().get("checks", {}).get("pool", {})
        return int(pool.get("ready", 0)), int(pool.get("target", 0))

    def wait_pool_full(self, timeout: float = 120.0) -> float:
        """Poll ``/readyz`` until the pool is at its target; returns the seconds it took.

        This is the one deliberate wait of the benchmark: pool hits are only measured on a full pool.
        """
        began = time.monotonic()
        deadline = began + timeout
        while True:
            checkpoint()
            ready, target = self.pool_ready()
            if ready >= target:
                return time.monotonic() - began
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name}: pool at {ready}/{target} after {timeout:g} s")
            time.sleep(0.02)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by ``name{labels}`` (labels as rendered, e.g. ``result="hit"``)."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for line in text.splitlines():
            match = _METRIC_LINE.match(line)
            if match is None or line.startswith("#"):
                continue
            key = match["name"] + (f"{{{match['labels']}}}" if match["labels"] else "")
            with contextlib.suppress(ValueError):
                samples[key] = float(match["value"])
        return samples

    def pool_claims(self) -> tuple[float, float]:
        """(hits, misses) so far, from ``tci_pool_claims_total``."""
        samples = self.metrics()
        return (
            samples.get('tci_pool_claims_total{result="hit"}', 0.0),
            samples.get('tci_pool_claims_total{result="miss"}', 0.0),
        )
