"""The Docker Engine as the benchmark sees it: host facts, container memory and label-based cleanup.

Every container the benchmark causes (its own, the orchestrators', llm-sandbox's) carries the
run's ``io.tci-orchestrator.test-run`` label, so one filter finds them all for removal.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import docker
import docker.errors

from orchestrator.backends import labels

_CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


def connect() -> docker.DockerClient:
    """A docker-py client for the default engine (``DOCKER_HOST`` or the local socket)."""
    client = docker.from_env(timeout=120)
    client.ping()
    return client


def run_label(run_id: str) -> str:
    """The engine label filter matching every container of one benchmark run."""
    return f"{labels.TEST_RUN}={run_id}"


def instance_label(instance: str) -> str:
    """The engine label filter matching one orchestrator instance's containers."""
    return f"{labels.INSTANCE}={instance}"


def labelled(client: docker.DockerClient, label: str) -> list[Any]:
    """Containers (any state) carrying ``label`` (``key`` or ``key=value``)."""
    # ignore_removed: an orchestrator may remove one between the listing and its inspection.
    return list(client.containers.list(all=True, filters={"label": label}, ignore_removed=True))


def remove_labelled(client: docker.DockerClient, label: str) -> int:
    """Force-remove every container carrying ``label``; returns how many were removed."""
    removed = 0
    for container in labelled(client, label):
        try:
            container.remove(force=True, v=True)
            removed += 1
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            # 409: a removal is already in progress (an orchestrator still shutting down).
            if exc.status_code != 409:
                raise
    return removed


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def host_facts(client: docker.DockerClient, image: str) -> dict[str, Any]:
    """The header of every report: what the numbers were measured on."""
    version = client.version()
    image_attrs = client.images.get(image).attrs
    info = client.info()
    return {
        "cores": os.cpu_count(),
        "memory_bytes": _meminfo_total(),
        "kernel": platform.release(),
        "docker_engine": version.get("Version"),
        "docker_api": version.get("ApiVersion"),
        "cgroup_version": info.get("CgroupVersion"),
        "storage_driver": info.get("Driver"),
        "image": image,
        "image_id": image_attrs.get("Id", "")[:19],
        "image_size_bytes": image_attrs.get("Size"),
        "python": platform.python_version(),
    }


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: other work on the machine shows up in every figure."""
    one, five, fifteen = os.getloadavg()
    return one, five, fifteen


def _cgroup_dir(container_id: str) -> Path | None:
    # cgroupfs driver first, then the systemd driver's scope naming.
    for candidate in (
        _CGROUP_V1_MEMORY / "docker" / container_id,
        _CGROUP_V1_MEMORY / "system.slice" / f"docker-{container_id}.scope",
    ):
        if (candidate / "memory.usage_in_bytes").exists():
            return candidate
    return None


def container_memory(client: docker.DockerClient, container_id: str) -> dict[str, int]:
    """The container cgroup's memory: ``usage`` (what the limit is charged), ``rss`` and page ``cache``.

    Reads the cgroup v1 files directly when this process can see them (cheap, exact), else asks
    the engine's stats API for the same counters.
    """
    directory = _cgroup_dir(container_id)
    if directory is not None:
        usage = int((directory / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
        stats = {key: int(value) for key, value in stat.items()}
    else:
        raw = client.api.stats(container_id, stream=False, one_shot=True).get("memory_stats", {})
        usage = int(raw.get("usage", 0))
        stats = {key: int(value) for key, value in raw.get("stats", {}).items()}
    return {
        "usage": usage,
        "rss": stats.get("total_rss", stats.get("anon", 0)),
        "cache": stats.get("total_cache", stats.get("file", 0)),
        "inactive_file": stats.get("total_inactive_file", stats.get("inactive_file", 0)),
    }
