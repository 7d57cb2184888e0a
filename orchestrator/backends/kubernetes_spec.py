"""Pure builders and readers of sandbox pods: the Docker hardening profile mapped onto a PodSpec.

Nothing here does I/O, so the whole mapping is unit-tested and validated against the Kubernetes
schemas offline. What a pod spec cannot say is covered at the node instead:

- per-pod pids limit: the kubelet's ``podPidsLimit`` (set it to ``SandboxSettings.pids``);
- ulimits (``nofile``, ``fsize``, ``core``): the container runtime's default ulimits on the node
  (containerd ``LimitNOFILE``/``LimitCORE`` of the service, CRI-O ``default_ulimits``);
- ``--init``: ``shareProcessNamespace`` makes the pod's pause process PID 1, which reaps zombies,
  and the runner is a child subreaper for its own descendants, as under Docker's init;
- ``network_mode=none``: the deny-all NetworkPolicy of ``deploy/kubernetes`` (with a CNI that
  enforces NetworkPolicy); the runner channel goes through the API server's attach instead.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from ..models import Claim
from ..settings import KubernetesSettings, SandboxSettings
from .docker_spec import HOME, USER_PACKAGES, WORKDIR, pip_environment, runner_environment

GROUP: Final = "tci-orchestrator.io"
MANAGED: Final = f"{GROUP}/managed"
INSTANCE: Final = f"{GROUP}/instance"
PROFILE: Final = f"{GROUP}/profile"
STATE: Final = f"{GROUP}/state"
SESSION: Final = f"{GROUP}/session"
TEST_RUN: Final = f"{GROUP}/test-run"
# Annotations: values a label cannot hold (tenant names may be 64 characters or end in "-").
CREATED: Final = f"{GROUP}/created"
CLAIM: Final = f"{GROUP}/claim"

RUNTIME_DEFAULT: Final = "RuntimeDefault"
WARM: Final = "warm"
CLAIMED: Final = "claimed"
CONTAINER: Final = "sandbox"
# Long enough for the runner to stop its kernel, short enough that a deleted pod frees its node fast.
TERMINATION_GRACE_SECONDS: Final = 2

_MOUNTS: Final = {"tmp": "/tmp", "workspace": WORKDIR, "home": HOME, "packages": USER_PACKAGES}


def selector(instance: str) -> str:
    """Label selector of this instance's sandbox pods and nothing else."""
    return f"{MANAGED}=true,{INSTANCE}={instance}"


def claim_metadata(claim: Claim) -> dict[str, Any]:
    """The metadata a claim writes on a pod: a label to select by, an annotation with the rest."""
    record = {
        "session_id": claim.session_id,
        "tenant": claim.tenant,
        "started_at": claim.started_at,
        "expires_at": claim.expires_at,
        "listed": claim.listed,
    }
    return {
        "labels": {STATE: CLAIMED, SESSION: claim.session_id},
        "annotations": {CLAIM: json.dumps(record, separators=(",", ":"))},
    }


def parse_claim(metadata: dict[str, Any]) -> Claim | None:
    """The claim recorded on a pod, or None for a warm pod (or an annotation that does not parse)."""
    labels = metadata.get("labels") or {}
    raw = (metadata.get("annotations") or {}).get(CLAIM)
    if labels.get(STATE) != CLAIMED or not raw:
        return None
    try:
        record = json.loads(raw)
        claim = Claim(
            session_id=str(record["session_id"]),
            tenant=str(record["tenant"]),
            started_at=float(record["started_at"]),
            expires_at=float(record["expires_at"]),
            listed=record.get("listed", True) is not False,
        )
    except (ValueError, KeyError, TypeError):
        return None
    # The label is what selectors see; an annotation disagreeing with it is not a claim to trust.
    return claim if labels.get(SESSION) == claim.session_id else None


def _quantity_cpu(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def _user(sandbox: SandboxSettings) -> tuple[int, int]:
    uid, _, gid = sandbox.user.partition(":")
    return int(uid), int(gid or uid)


def pod_manifest(
    sandbox: SandboxSettings,
    kube: KubernetesSettings,
    *,
    name: str,
    instance: str,
    profile: str,
    created_at: float,
    claim: Claim | None,
    test_run: str | None = None,
) -> dict[str, Any]:
    """The Pod object for one sandbox: the Docker profile of ``docker_spec`` in Kubernetes terms.

    Requests are what the scheduler packs by (an idle session uses ~78 MiB); limits are the
    session's hard ceiling, as ``mem_limit``/``nano_cpus`` are under Docker. The memory-backed
    volumes count against the memory limit, as Docker's tmpfs mounts do.
    """
    uid, gid = _user(sandbox)
    labels = {MANAGED: "true", INSTANCE: instance, PROFILE: profile, STATE: WARM}
    annotations = {CREATED: f"{created_at:.3f}"}
    if test_run:
        labels[TEST_RUN] = test_run
    if claim is not None:
        recorded = claim_metadata(claim)
        labels.update(recorded["labels"])
        annotations.update(recorded["annotations"])
    seccomp: dict[str, Any] = (
        {"type": "RuntimeDefault"}
        if kube.seccomp_profile == RUNTIME_DEFAULT
        else {"type": "Localhost", "localhostProfile": kube.seccomp_profile}
    )
    limits = {
        "cpu": _quantity_cpu(sandbox.cpus),
        "memory": str(sandbox.memory_bytes),
        "ephemeral-storage": str(kube.ephemeral_storage_bytes),
    }
    requests = {
        "cpu": _quantity_cpu(min(kube.cpu_request, sandbox.cpus)),
        "memory": str(min(kube.memory_request_bytes, sandbox.memory_bytes)),
        "ephemeral-storage": str(min(kube.ephemeral_storage_bytes, 16 * 1024 * 1024)),
    }
    sizes = {
        "tmp": sandbox.tmp_bytes,
        "workspace": sandbox.workspace_bytes,
        "home": sandbox.home_bytes,
        "packages": sandbox.packages_bytes,
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": kube.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": True,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "fsGroup": gid,
            "seccompProfile": seccomp,
        },
        "containers": [
            {
                "name": CONTAINER,
                "image": sandbox.image,
                "imagePullPolicy": kube.image_pull_policy,
                # The runner channel: attach to stdin/stdout; stdin stays open across attaches.
                "stdin": True,
                "stdinOnce": False,
                "tty": False,
                "workingDir": WORKDIR,
                # No socket directory to carry the index gate: pip is told at once that installs are off.
                "env": [
                    {"name": k, "value": v}
                    for k, v in (runner_environment(sandbox) | pip_environment(sandbox, None)).items()
                ],
                "resources": {"requests": requests, "limits": limits},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "privileged": False,
                    "readOnlyRootFilesystem": True,
                    "runAsNonRoot": True,
                    "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": seccomp,
                },
                "volumeMounts": [{"name": volume, "mountPath": path} for volume, path in _MOUNTS.items()],
            }
        ],
        "volumes": [
            {"name": volume, "emptyDir": {"medium": "Memory", "sizeLimit": str(sizes[volume])}} for volume in _MOUNTS
        ],
    }
    if kube.runtime_class:
        spec["runtimeClassName"] = kube.runtime_class
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": kube.namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    }


@dataclass(frozen=True)
class PodState:
    """What the backend reads from a pod's status."""

    running: bool
    finished: bool
    image_missing: bool
    reason: str


_IMAGE_REASONS: Final = frozenset({"ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName"})


def pod_state(pod: dict[str, Any]) -> PodState:
    """Whether the sandbox container runs, has ended, or cannot start because its image is missing."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    container: dict[str, Any] = next(
        (c for c in status.get("containerStatuses") or [] if c.get("name") == CONTAINER), {}
    )
    state = container.get("state") or {}
    waiting = (state.get("waiting") or {}).get("reason") or ""
    terminating = metadata.get("deletionTimestamp") is not None
    finished = phase in {"Succeeded", "Failed"} or "terminated" in state or terminating
    running = phase == "Running" and "running" in state and not terminating
    image_missing = waiting in _IMAGE_REASONS
    return PodState(running=running, finished=finished, image_missing=image_missing, reason=waiting or phase)


def created_at(metadata: dict[str, Any]) -> float:
    """When the pod was made: our annotation (sub-second), else the API server's timestamp."""
    raw = (metadata.get("annotations") or {}).get(CREATED)
    with contextlib.suppress(TypeError, ValueError):
        return float(str(raw))
    stamp = metadata.get("creationTimestamp")
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if isinstance(stamp, str):
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return 0.0
