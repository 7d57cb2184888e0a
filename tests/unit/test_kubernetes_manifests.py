"""deploy/kubernetes: every object validates against the Kubernetes 1.30 schemas, offline.

The overlays are rendered here with the subset of kustomize they use (resources, a
configMapGenerator without hash suffixes, image overrides, RFC 6902 patches with jsonpatch), and
each rendered object goes through kubernetes-validate in strict mode (unknown fields fail). The
pod the backend builds is validated the same way, and against the namespace's Pod Security level.
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from orchestrator.backends import kubernetes_spec as spec
from orchestrator.settings import KubernetesSettings, SandboxSettings, Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
PACKAGE_PROFILE = Path(__file__).resolve().parents[2] / "orchestrator" / "backends" / "seccomp.json"
SCHEMA_VERSION = "1.30.0"


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize directory`` prints, for the features these kustomizations use."""
    (kustomization,) = _load(directory / "kustomization.yaml")
    known = {"apiVersion", "kind", "resources", "generatorOptions", "images", "patches"}
    known |= {"configMapGenerator", "secretGenerator"}
    assert set(kustomization) <= known, f"kustomize features this renderer does not know: {set(kustomization) - known}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects.extend(render(path) if path.is_dir() else _load(path))
    assert kustomization.get("generatorOptions", {"disableNameSuffixHash": True}) == {"disableNameSuffixHash": True}
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        metadata = {"name": generator["name"], "namespace": generator["namespace"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for generator in kustomization.get("secretGenerator", []):
        assert generator.get("behavior") == "replace"
        data = {Path(f).name: base64.b64encode((directory / f).read_bytes()).decode() for f in generator["files"]}
        metadata = {"name": generator["name"], "namespace": generator["namespace"]}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": data}
        (replaced,) = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == generator["name"]]
        objects[objects.index(replaced)] = secret
    for override in kustomization.get("images", []):
        for obj in objects:
            for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if container["image"].split(":")[0] == override["name"]:
                    container["image"] = f"{override['newName']}:{override['newTag']}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        assert len(matched) == 1, f"patch target {target} matches {len(matched)} objects"
        patched = jsonpatch.apply_patch(matched[0], yaml.safe_load(patch["patch"]))
        objects[objects.index(matched[0])] = patched
    return objects


OVERLAYS = {"base": Path("base"), "production": Path("overlays") / "production"}
KEYS = {"sk-test-key": "team-a"}


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    """A copy of deploy/kubernetes with the operator's api-keys.json written, as before an apply."""
    copy_of = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, copy_of)
    (copy_of / OVERLAYS["production"] / "api-keys.json").write_text(json.dumps(KEYS))
    return copy_of


@pytest.fixture(params=list(OVERLAYS))
def rendered(request: pytest.FixtureRequest, deploy: Path) -> list[dict[str, Any]]:
    return render(deploy / OVERLAYS[request.param])


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_kubernetes_manifests_validate_against_the_schemas(rendered: list[dict[str, Any]]) -> None:
    optional = [doc for path in sorted((DEPLOY / "optional").glob("*.yaml")) for doc in _load(path)]
    for obj in rendered + optional:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    kinds = {o["kind"] for o in rendered}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "ConfigMap", "Secret"} <= kinds
    assert {"Deployment", "Service", "DaemonSet"} <= kinds


def test_kubernetes_role_grants_only_what_the_backend_uses(rendered: list[dict[str, Any]]) -> None:
    role = _one(rendered, "Role", "tci-orchestrator")
    assert role["metadata"]["namespace"] == "tci-sandboxes"
    grants = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert grants == {
        (("",), ("pods",)): {"create", "get", "list", "watch", "patch", "delete"},
        (("",), ("pods/attach",)): {"get", "create"},
        (("coordination.k8s.io",), ("leases",)): {"get", "create", "update"},
    }
    assert not [o for o in rendered if o["kind"] in {"ClusterRole", "ClusterRoleBinding"}]


def test_kubernetes_sandbox_namespace_denies_all_traffic(rendered: list[dict[str, Any]]) -> None:
    policies = [o for o in rendered if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == "tci-sandboxes"]
    (deny,) = policies
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    namespace = _one(rendered, "Namespace", "tci-sandboxes")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_kubernetes_seccomp_profile_shipped_to_nodes_is_the_backends(rendered: list[dict[str, Any]]) -> None:
    profile = _one(rendered, "ConfigMap", "tci-seccomp-profile")
    assert json.loads(profile["data"]["seccomp.json"]) == json.loads(PACKAGE_PROFILE.read_text())
    installer = _one(rendered, "DaemonSet", "tci-seccomp-installer")
    (host,) = [v for v in installer["spec"]["template"]["spec"]["volumes"] if "hostPath" in v]
    config = _one(rendered, "ConfigMap", "tci-orchestrator")["data"]
    # The kubelet resolves Localhost profiles under <root>/seccomp; the installer writes the profile
    # to the relative path the backend names.
    assert host["hostPath"]["path"] == "/var/lib/kubelet/seccomp"
    script = installer["spec"]["template"]["spec"]["containers"][0]["args"][0]
    directory, _, file_name = config["ORCH_KUBERNETES__SECCOMP_PROFILE"].partition("/")
    assert f'"/host-seccomp/{directory}"' in script
    assert f'target / "{file_name}"' in script


def test_kubernetes_configmap_is_valid_orchestrator_settings(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _one(rendered, "ConfigMap", "tci-orchestrator")["data"]
    secret = _one(rendered, "Secret", "tci-api-keys")
    keys = tmp_path / "api-keys.json"
    if "data" in secret:
        keys.write_bytes(base64.b64decode(secret["data"]["api-keys.json"]))
    else:
        keys.write_text(secret["stringData"]["api-keys.json"])
    for name, value in {**config, "ORCH_API_KEYS_FILE": str(keys)}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.backend == "kubernetes"
    assert settings.kubernetes.namespace == "tci-sandboxes"
    assert settings.kubernetes.leader_election
    assert settings.key_map() == (KEYS if settings.mode == "production" else {})


def test_kubernetes_production_overlay_sets_mode_images_and_keys(deploy: Path) -> None:
    objects = render(deploy / OVERLAYS["production"])
    secret = _one(objects, "Secret", "tci-api-keys")
    assert json.loads(base64.b64decode(secret["data"]["api-keys.json"])) == KEYS
    assert not (DEPLOY / OVERLAYS["production"] / "api-keys.json").exists(), "keys must not be committed"
    config = _one(objects, "ConfigMap", "tci-orchestrator")["data"]
    assert config["ORCH_MODE"] == "production"
    assert config["ORCH_SANDBOX__IMAGE"].startswith("registry.example.com/")
    deployment = _one(objects, "Deployment", "tci-orchestrator")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.example.com/")
    # The base stays as it was: the overlay patched copies.
    assert _one(render(deploy / OVERLAYS["base"]), "ConfigMap", "tci-orchestrator")["data"]["ORCH_MODE"] == "dev"


def _pod(**kube: Any) -> dict[str, Any]:
    return spec.pod_manifest(
        SandboxSettings(),
        KubernetesSettings(**kube),
        name="tci-0123456789abcdef",
        instance="default",
        profile="abc123def456",
        created_at=1_700_000_000.5,
        claim=None,
    )


@pytest.mark.parametrize("kube", [{}, {"seccomp_profile": "RuntimeDefault", "runtime_class": "gvisor"}])
def test_kubernetes_sandbox_pod_validates_and_meets_restricted(kube: dict[str, Any]) -> None:
    pod = _pod(**kube)
    kubernetes_validate.validate(copy.deepcopy(pod), SCHEMA_VERSION, strict=True)
    pod_spec = pod["spec"]
    (container,) = pod_spec["containers"]
    context = container["securityContext"]
    # The "restricted" Pod Security Standard, field by field.
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert context["seccompProfile"]["type"] in {"RuntimeDefault", "Localhost"}
    assert all(set(v) == {"name", "emptyDir"} for v in pod_spec["volumes"])
    assert not any(pod_spec[k] for k in ("hostNetwork", "hostPID", "hostIPC"))
