"""The Docker backend's handling of engine answers, with a stand-in for docker-py's client."""

from __future__ import annotations

from typing import Any

import docker.errors
import pytest
import requests

from orchestrator.backends.docker import DockerBackend
from orchestrator.settings import Settings


def _conflict() -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = 409
    return docker.errors.APIError("Conflict. The container name is already in use", response=response)


class _Containers:
    def __init__(self, conflicts: int) -> None:
        self.conflicts = conflicts
        self.created: list[dict[str, Any]] = []

    def create(self, **config: Any) -> str:
        if self.conflicts:
            self.conflicts -= 1
            raise _conflict()
        self.created.append(config)
        return "container"


class _Api:
    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_container(self, name: str, force: bool, v: bool) -> None:
        self.removed.append(name)


class _Client:
    def __init__(self, conflicts: int) -> None:
        self.containers = _Containers(conflicts)
        self.api = _Api()


def test_a_claimed_name_held_by_a_failed_first_attempt_is_freed_and_the_create_retried() -> None:
    client = _Client(conflicts=2)
    backend = DockerBackend(Settings(), client=client)  # type: ignore[arg-type]
    assert backend._create_container({"name": "tci.x.s-1"}, claimed=True) == "container"
    assert client.api.removed == ["tci.x.s-1", "tci.x.s-1"]
    assert client.containers.created == [{"name": "tci.x.s-1"}]


def test_a_pool_name_conflict_is_not_resolved_by_removing_anything() -> None:
    client = _Client(conflicts=1)
    backend = DockerBackend(Settings(), client=client)  # type: ignore[arg-type]
    with pytest.raises(docker.errors.APIError):
        backend._create_container({"name": "tci.x.pool-1"}, claimed=False)
    assert client.api.removed == []
