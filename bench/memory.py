"""Memory per idle live session: the container cgroup of every session of one orchestrator instance."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import docker

from orchestrator.backends import labels

from .engine import container_memory, instance_label, labelled


@dataclass(frozen=True)
class SessionMemory:
    """Bytes per session container (one entry per session)."""

    usage: list[int]
    rss: list[int]
    cache: list[int]
    working_set: list[int]
    """Usage minus inactive file cache, which the kernel reclaims first under pressure."""


def session_containers(client: docker.DockerClient, instance: str, session_ids: Collection[str]) -> list[str]:
    """Container ids of the given sessions; the claim is recorded in each container's name."""
    wanted = set(session_ids)
    found = []
    for container in labelled(client, instance_label(instance)):
        claim = labels.parse_claim(container.name)
        if claim is not None and claim.session_id in wanted:
            found.append(container.id)
    if len(found) != len(wanted):
        raise RuntimeError(f"found {len(found)} containers for {len(wanted)} sessions of {instance}")
    return found


def idle_session_memory(client: docker.DockerClient, instance: str, session_ids: Collection[str]) -> SessionMemory:
    """Current cgroup memory of each session's container (sessions idle: no execute running)."""
    memory = SessionMemory(usage=[], rss=[], cache=[], working_set=[])
    for container_id in session_containers(client, instance, session_ids):
        sample = container_memory(client, container_id)
        memory.usage.append(sample["usage"])
        memory.rss.append(sample["rss"])
        memory.cache.append(sample["cache"])
        memory.working_set.append(sample["usage"] - sample["inactive_file"])
    return memory
