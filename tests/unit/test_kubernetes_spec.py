"""The pure half of the Kubernetes backend: the Docker profile mapped to a pod, claims on pod metadata."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.backends import kubernetes_spec as spec
from orchestrator.backends.docker_spec import container_config
from orchestrator.models import Claim
from orchestrator.settings import KubernetesSettings, SandboxSettings, Settings

MiB = 1024 * 1024


def _pod(claim: Claim | None = None, **sandbox: object) -> dict:
    return spec.pod_manifest(
        SandboxSettings(**sandbox),  # type: ignore[arg-type]
        KubernetesSettings(),
        name="tci-0123456789abcdef",
        instance="prod",
        profile="abc123def456",
        created_at=1_700_000_000.25,
        claim=claim,
        test_run="k8sabc",
    )


def test_kubernetes_pod_carries_the_docker_limits() -> None:
    sandbox = SandboxSettings(memory_bytes=512 * MiB, cpus=0.5, tmp_bytes=32 * MiB)
    docker = container_config(sandbox, name="x", labels={}, seccomp_profile="{}")
    (container,) = _pod(memory_bytes=512 * MiB, cpus=0.5, tmp_bytes=32 * MiB)["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == str(docker["mem_limit"])
    assert container["resources"]["limits"]["cpu"] == "500m"
    assert {e["name"]: e["value"] for e in container["env"]} == docker["environment"]
    assert container["workingDir"] == docker["working_dir"]
    assert container["stdin"] is True
    assert container["stdinOnce"] is False
    volumes = {v["name"]: v["emptyDir"] for v in _pod(tmp_bytes=32 * MiB)["spec"]["volumes"]}
    assert volumes["tmp"] == {"medium": "Memory", "sizeLimit": str(32 * MiB)}


def test_kubernetes_pod_runs_as_the_sandbox_user_without_token_or_links() -> None:
    pod_spec = _pod()["spec"]
    assert pod_spec["securityContext"]["runAsUser"] == 10001
    assert pod_spec["securityContext"]["runAsGroup"] == 10001
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["enableServiceLinks"] is False
    assert pod_spec["shareProcessNamespace"] is True
    assert pod_spec["terminationGracePeriodSeconds"] == spec.TERMINATION_GRACE_SECONDS
    assert pod_spec["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "tci-orchestrator/seccomp.json",
    }


def test_kubernetes_claim_round_trips_through_pod_metadata() -> None:
    claim = Claim("ses_abcdefghijklmnopqrstuv", "a-tenant-name-ending-in-dash-", 1_700_000_000.123, 1_700_003_600.5)
    metadata = _pod(claim)["metadata"]
    assert metadata["labels"][spec.STATE] == spec.CLAIMED
    assert metadata["labels"][spec.SESSION] == claim.session_id
    assert spec.parse_claim(metadata) == claim
    held = Claim("ses_abcdefghijklmnopqrstuv", "t", 1_700_000_000.0, 1_700_003_600.0, listed=False)
    assert spec.parse_claim(_pod(held)["metadata"]) == held
    warm = _pod()["metadata"]
    assert warm["labels"][spec.STATE] == spec.WARM
    assert spec.parse_claim(warm) is None
    assert spec.created_at(warm) == 1_700_000_000.25


@pytest.mark.parametrize(
    "tamper",
    [
        {"labels": {spec.SESSION: "ses_other"}},
        {"labels": {spec.STATE: spec.WARM}},
        {"annotations": {spec.CLAIM: "not json"}},
        {"annotations": {spec.CLAIM: '{"session_id": "ses_abcdefghijklmnopqrstuv"}'}},
    ],
)
def test_kubernetes_claim_that_does_not_add_up_is_no_claim(tamper: dict) -> None:
    claim = Claim("ses_abcdefghijklmnopqrstuv", "team", 1.0, 2.0)
    metadata = _pod(claim)["metadata"]
    for key, values in tamper.items():
        metadata[key].update(values)
    assert spec.parse_claim(metadata) is None


def _status(phase: str, state: dict | None = None) -> dict:
    return {"phase": phase, "containerStatuses": [{"name": "sandbox", "state": state}] if state else []}


@pytest.mark.parametrize(
    ("status", "deleting", "expected"),
    [
        (_status("Pending"), False, (False, False, False)),
        (_status("Running", {"running": {}}), False, (True, False, False)),
        (_status("Running", {"running": {}}), True, (False, True, False)),
        (_status("Failed", {"terminated": {}}), False, (False, True, False)),
        (_status("Pending", {"waiting": {"reason": "ImagePullBackOff"}}), False, (False, False, True)),
    ],
)
def test_kubernetes_pod_state_from_status(status: dict, deleting: bool, expected: tuple[bool, bool, bool]) -> None:
    metadata = {"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {}
    state = spec.pod_state({"metadata": metadata, "status": status})
    assert (state.running, state.finished, state.image_missing) == expected


def test_kubernetes_instance_must_be_a_label_value() -> None:
    with pytest.raises(ValidationError, match="label value"):
        Settings(backend="kubernetes", instance="ends-with-dash-")
    assert Settings(backend="docker", instance="ends-with-dash-").instance == "ends-with-dash-"


def test_kubernetes_backend_is_allowed_in_production_and_local_is_not() -> None:
    keys = {"sk-1": "team"}
    assert Settings(backend="kubernetes", mode="production", api_keys=keys).backend == "kubernetes"
    with pytest.raises(ValidationError, match="local backend"):
        Settings(backend="local", mode="production", api_keys=keys)


def test_kubernetes_runtime_default_seccomp_and_runtime_class_are_options() -> None:
    kube = KubernetesSettings(seccomp_profile="RuntimeDefault", runtime_class="gvisor")
    pod = spec.pod_manifest(
        SandboxSettings(), kube, name="tci-x", instance="prod", profile="p", created_at=0.0, claim=None
    )
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["containers"][0]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["runtimeClassName"] == "gvisor"
    assert "runtimeClassName" not in _pod()["spec"]
