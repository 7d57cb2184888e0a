"""The compat suite's moving parts: a running server, and client scripts run in SDK virtualenvs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

CLIENTS = Path(__file__).resolve().parents[1] / "compat" / "clients"
RESULT_PREFIX = "TCI-COMPAT-RESULT: "
CLIENT_TIMEOUT = 240.0
LOG_TAIL_CHARS = 12_000


@dataclass
class Server:
    """A running orchestrator process and where its log goes."""

    backend: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-LOG_TAIL_CHARS:]

    def check_alive(self) -> None:
        """Fail the test, showing the server log, if the server has exited."""
        code = self.process.poll()
        if code is not None:
            pytest.fail(f"the {self.backend} server exited with code {code}; its log:\n{self.log_tail()}")


@dataclass
class SdkRunner:
    """Runs client scripts for one test, under one API key, and cleans up its sessions."""

    server: Server
    python_for: Callable[[str], Path]
    api_key: str = field(default_factory=lambda: f"compat-{secrets.token_hex(8)}")

    def run(self, client: str, scenario: str, base_url: str) -> dict[str, Any]:
        """Run ``scenario`` with ``client`` (v1, v2 or v2-strict) against ``base_url``; its JSON result."""
        generation, _, mode = client.partition("-")
        script = CLIENTS / f"{generation}_client.py"
        argv = [str(self.python_for(generation)), str(script), scenario]
        if mode == "strict":
            argv.append("--strict")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOGETHER_", "PYTEST_"))}
        env.update(TCI_BASE_URL=base_url, TOGETHER_API_KEY=self.api_key, TOGETHER_NO_BANNER="1")
        self.server.check_alive()
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=CLIENT_TIMEOUT, check=False, cwd=CLIENTS
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if done.returncode != 0 or len(lines) != 1:
            self.server.check_alive()
            pytest.fail(
                f"{client} {scenario} against {base_url} exited with {done.returncode}\n"
                f"--- stdout ---\n{done.stdout[-LOG_TAIL_CHARS:]}\n--- stderr ---\n{done.stderr[-LOG_TAIL_CHARS:]}\n"
                f"--- server log ---\n{self.server.log_tail()}"
            )
        result: dict[str, Any] = json.loads(lines[0][len(RESULT_PREFIX) :])
        return result

    def cleanup(self) -> None:
        """End every session this test's key created (``DELETE`` extension)."""
        if self.server.process.poll() is not None:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.server.url, headers=headers, timeout=30) as http:
            listed = http.get("/tci/sessions")
            listed.raise_for_status()
            for session in listed.json()["data"]["sessions"]:
                gone = http.delete(f"/tci/sessions/{session['id']}")
                assert gone.status_code in {204, 404}, gone.text
