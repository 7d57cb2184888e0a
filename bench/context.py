"""State shared by the phases of one run: ids, plan, engine client, servers and the results."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from orchestrator.backends import labels
from orchestrator.settings import SandboxSettings, Settings

from . import engine
from .plan import Plan
from .progress import say
from .server import Server
from .stats import scaled, summarize


def figure(samples: Sequence[float], unit: str, factor: float = 1.0) -> dict[str, Any]:
    """A results entry: the samples (in ``unit``) and their summary."""
    values = scaled(samples, factor)
    return {"unit": unit, "summary": summarize(values).to_json(), "samples": values}


@dataclass
class Context:
    run_id: str
    plan: Plan
    work_dir: Path
    docker: docker.DockerClient
    image: str = SandboxSettings.model_fields["image"].default
    figures: dict[str, Any] = field(default_factory=dict)
    servers: list[Server] = field(default_factory=list)
    cleanup: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    # Runner sockets of the whole run, removed with it (containers removed by label leave theirs).
    socket_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tci-bench-")))

    def settings(self, name: str) -> Settings:
        """Settings for containers the benchmark starts itself (defaults, own instance, run label)."""
        return Settings(
            instance=f"{self.run_id}-{name}",
            test_run_label=self.run_id,
            socket_dir=self.socket_dir,
            sandbox=SandboxSettings(image=self.image),
        )

    def start_server(self, name: str, env: dict[str, str]) -> Server:
        server = Server(
            name,
            run_id=self.run_id,
            log_dir=self.work_dir / "logs" / self.run_id,
            socket_dir=self.socket_dir,
            env={"ORCH_SANDBOX__IMAGE": self.image, **env},
        )
        self.servers.append(server)
        server.start()
        return server

    def containers_of(self, server: Server) -> tuple[int, int]:
        """(session containers, warm-pool containers) of ``server``'s instance on the engine now."""
        found = engine.labelled(self.docker, engine.instance_label(server.instance))
        sessions = sum(1 for container in found if labels.parse_claim(container.name) is not None)
        return sessions, len(found) - sessions

    def session_leftovers(self, server: Server) -> int:
        """Stop ``server`` and count the session containers it left (0 once every session was closed)."""
        server.stop()
        leftovers, _ = self.containers_of(server)
        self.stop_server(server)
        return leftovers

    def stop_server(self, server: Server) -> int:
        """Stop ``server`` and remove what it left (its warm pool stays on the engine by design)."""
        server.stop()
        if server in self.servers:
            self.servers.remove(server)
        return engine.remove_labelled(self.docker, engine.instance_label(server.instance))

    def close(self) -> int:
        """Stop every server, run the registered cleanups, remove every container of the run."""
        for server in list(self.servers):
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                say(f"stopping server {server.name} failed: {exc}")
        self.servers.clear()
        self.cleanup.close()
        removed = engine.remove_labelled(self.docker, engine.run_label(self.run_id))
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        return removed
