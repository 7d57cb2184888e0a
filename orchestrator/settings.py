"""Configuration: one ``Settings`` object, read from ``ORCH_*`` environment variables.

Build it once (``__main__`` does) and pass it down; nothing reads the environment anywhere else.
Every field is listed, with its variable, in the README's configuration table and in
``deploy/orchestrator.env.example``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
K8S_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


class SandboxSettings(BaseModel):
    """How each session container is built. Limits apply per session."""

    image: str = "tci-sandbox:latest"
    memory_bytes: int = Field(1024 * MiB, ge=128 * MiB)
    """Memory limit; swap is disabled by setting memory+swap to the same value."""
    cpus: float = Field(1.0, gt=0)
    pids: int = Field(256, ge=32)
    tmp_bytes: int = Field(128 * MiB, ge=MiB)
    """Size of /tmp (tmpfs, charged to the memory limit)."""
    workspace_bytes: int = Field(256 * MiB, ge=MiB)
    """Size of the working directory /workspace (tmpfs, charged to the memory limit)."""
    home_bytes: int = Field(256 * MiB, ge=MiB)
    """Size of the home directory /home/sandbox (tmpfs, charged to the memory limit)."""
    packages_bytes: int = Field(256 * MiB, ge=MiB)
    """Size of /opt/venv/local, where `!pip install` puts packages (tmpfs, charged to the memory limit)."""
    nofile: int = Field(4096, ge=64)
    max_file_size_bytes: int = Field(512 * MiB, ge=MiB)
    network: str = "none"
    """Docker network mode; anything but "none" gives sessions egress (e.g. for `!pip install`)."""
    runtime: str | None = None
    """OCI runtime such as "runsc" (gVisor); None uses the engine's default."""
    library_volumes: bool = True
    """Docker: mount the trees the image names in its ``tci.sandbox.library-paths`` label from
    read-only engine volumes, filled once per image (backends/library.py): faster starts and imports
    where the storage driver runs in userspace."""
    channel: Literal["socket", "attach"] = "socket"
    """How the orchestrator reaches the runner: "socket" (a Unix socket per session under
    ``socket_dir``; the orchestrator must share that path with the engine's host) or "attach" (the
    container's stdin/stdout through the engine: remote engines, Docker Desktop, gVisor)."""
    log_driver: str = "none"
    """With the attach channel the runner's stdout is the protocol, so the default keeps it off disk."""
    user: str = "10001:10001"
    seccomp_profile: Path | None = None
    """A seccomp JSON file; None uses the profile shipped with the orchestrator."""
    max_stream_bytes: int = Field(1 * MiB, ge=1024)
    """Per-execute cap on stdout and on stderr, enforced inside the sandbox."""
    max_output_bytes: int = Field(8 * MiB, ge=1024)
    """Per-execute cap on all outputs together, images included."""

    @field_validator("user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value.split(":")[0] in {"0", "root"}:
            raise ValueError("sandboxes must not run as root")
        return value

    def profile_key(self) -> str:
        """A short digest of everything that makes two sandboxes interchangeable (pool matching)."""
        digest = hashlib.sha256(self.model_dump_json().encode()).hexdigest()
        return digest[:12]


class PackageSettings(BaseModel):
    """`!pip install` inside sandboxes: through the index gate to the package cache, nothing else."""

    enabled: bool = True
    """False: sandboxes get no index at all and pip says installs are disabled on this server."""
    cache_url: str = "http://127.0.0.1:3141"
    """The package cache (``python -m orchestrator.package_cache``; compose runs it as a service)."""
    max_download_bytes: int = Field(1024 * MiB, ge=MiB)
    """Bytes one session may download through the gate over its life (index pages included)."""
    request_timeout_seconds: float = Field(120, gt=0)
    """Longest one index or file request may take (a cold file is fetched upstream first)."""
    max_concurrent_requests: int = Field(4, ge=1)
    """Requests one session has in flight; more wait their turn (within the timeout)."""


class PackageCacheSettings(BaseModel):
    """The package cache process (``python -m orchestrator.package_cache``): upstream and disk."""

    host: str = "127.0.0.1"
    port: int = 3141
    upstream_url: str = "https://pypi.org/simple/"
    """The index the cache mirrors (PEP 503 simple API)."""
    upstream_ca_bundle: Path | None = None
    """Extra CA certificates (PEM) trusted for the upstream, e.g. a corporate TLS proxy's."""
    upstream_username: str | None = None
    upstream_password: SecretStr | None = None
    upstream_password_file: Path | None = None
    """A file holding the upstream password (a mounted secret); wins over ``upstream_password``."""
    cache_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / f"tci-package-cache-{os.getuid()}")
    cache_bytes: int = Field(5 * 1024 * MiB, ge=16 * MiB)
    """Files beyond this are evicted, least used first."""
    index_ttl_seconds: int = Field(1800, ge=0)
    """How long an index page is served before it is asked for again; on upstream failure the
    last good page keeps being served."""
    download_timeout_seconds: float = Field(110, gt=0)
    threads: int = Field(16, ge=1)


class KubernetesSettings(BaseModel):
    """Where and how the Kubernetes backend runs sandbox pods (``ORCH_BACKEND=kubernetes``)."""

    namespace: str = "tci-sandboxes"
    """Namespace of the sandbox pods; the orchestrator's Role must grant pods and pods/attach there."""
    kubeconfig: Path | None = None
    """A kubeconfig file; None: the in-cluster service account, else the default kubeconfig."""
    seccomp_profile: str = Field("tci-orchestrator/seccomp.json", min_length=1)
    """``Localhost`` profile path under the kubelet's seccomp directory, or ``RuntimeDefault`` for
    the container runtime's own profile."""
    runtime_class: str | None = None
    """RuntimeClass of sandbox pods, e.g. "gvisor" or "kata-qemu"; None: the cluster default."""
    memory_request_bytes: int = Field(128 * MiB, ge=16 * MiB)
    """Memory a sandbox pod requests (what the scheduler packs by; an idle session uses ~78 MiB)."""
    cpu_request: float = Field(0.05, gt=0)
    """CPUs a sandbox pod requests; its limit is ``sandbox.cpus``."""
    ephemeral_storage_bytes: int = Field(256 * MiB, ge=MiB)
    """Ephemeral-storage limit of a sandbox pod (its logs and anything outside the memory volumes)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str = "tci-sandbox"
    """Service account of sandbox pods; its token is never mounted."""
    max_concurrent_calls: int = Field(64, ge=1)
    """API-server connections in flight."""
    leader_election: bool = False
    """Replicas take turns through a coordination.k8s.io Lease: only its holder starts serving,
    and one that loses it exits. Standbys take over within ``lease_duration_seconds``."""
    lease_name: str = Field("tci-orchestrator", pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    """The Lease (in ``namespace``); one per instance."""
    lease_duration_seconds: int = Field(15, gt=1)
    renew_deadline_seconds: float = Field(10, gt=1)
    retry_period_seconds: float = Field(2, ge=1)


class Settings(BaseSettings):
    """The orchestrator's settings; see the README for the table of variables."""

    model_config = SettingsConfigDict(
        env_prefix="ORCH_",
        env_nested_delimiter="__",
        env_file=None,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    host: str = "127.0.0.1"
    port: int = 8000
    mode: Literal["dev", "production"] = "dev"
    """dev: any bearer key works and names its own tenant. production: only configured keys."""
    api_keys: dict[str, str] = Field(default_factory=dict)
    """API key -> tenant, e.g. ORCH_API_KEYS='{"sk-abc": "team-a"}'."""
    api_keys_file: Path | None = None
    """A JSON file with the same mapping (merged over ``api_keys``)."""
    backend: Literal["docker", "kubernetes", "local"] = "docker"
    """kubernetes runs one pod per session; local runs sandboxes as plain child processes WITHOUT
    isolation: tests and hacking only."""
    instance: str = "default"
    """Name of this deployment; containers of other instances on the same engine are left alone."""

    session_lifespan_seconds: float = Field(3600, gt=0)
    session_idle_timeout_seconds: float = Field(0, ge=0)
    """0 disables the idle timeout."""
    execute_timeout_seconds: float = Field(30, gt=0)
    """Wall-clock limit of one execute; below the 2.x SDK's 60 s read timeout on purpose."""
    max_execute_timeout_seconds: float = Field(600, gt=0)
    """Largest ``timeout`` an execute request may ask for (never below ``execute_timeout_seconds``)."""
    stream_keepalive_seconds: float = Field(15, gt=0)
    """A comment line is sent on a streaming execute after this long without output."""
    max_download_bytes: int = Field(256 * MiB, ge=1)
    """Largest file the file routes download (413 beyond)."""
    max_sessions: int = Field(64, ge=1)
    """Global cap on live sessions plus warm-pool containers."""
    max_sessions_per_tenant: int = Field(32, ge=1)
    max_queued_per_session: int = Field(16, ge=1)
    """Executes waiting behind a running one on the same session before 429."""
    max_body_bytes: int = Field(16 * MiB, ge=1024)
    max_concurrent_creates: int = Field(4, ge=1)
    """Containers starting at once; more wait their turn."""
    create_wait_seconds: float = Field(20, gt=0)
    """Longest a new session waits for its turn to start a container before 429 (nothing ran): well
    inside the SDKs' own timeouts, so a client never gives up on a request that later runs its code."""

    pool_size: int = Field(2, ge=0)
    """Warm containers kept ready per profile; 0 turns the pool off."""
    pool_max_age_seconds: float = Field(1800, gt=0)

    run_code_tenant: str | None = None
    """Tenant that SandboxFusion calls without an Authorization header run as; unset: "sandbox-fusion"
    in dev mode, 401 in production."""
    run_code_sandboxes: int = Field(16, ge=1)
    """Sandboxes per tenant that serve /run_code, each one request at a time (also within the tenant cap)."""
    run_code_wait_seconds: float = Field(10, ge=0)
    """How long a /run_code request waits for a free sandbox before a 504."""
    run_code_idle_seconds: float = Field(120, gt=0)
    """/run_code sandboxes idle this long are removed."""

    reaper_interval_seconds: float = Field(15, gt=0)
    orphan_grace_seconds: float = Field(60, ge=0)
    """Unaccounted containers younger than this are left alone (they may be starting)."""

    socket_dir: Path = Field(default_factory=lambda: Path(tempfile.gettempdir()) / f"tci-orchestrator-{os.getuid()}")
    """Host directory for the per-session runner sockets (the socket channel). Run in a container,
    the orchestrator must see it at the same path as the engine's host does."""
    runner_ready_timeout_seconds: float = Field(60, gt=0)
    max_frame_bytes: int = Field(64 * MiB, ge=MiB)
    docker_max_concurrent_calls: int = Field(16, ge=1)

    log_format: Literal["json", "console"] = "json"
    log_level: str = "INFO"
    test_run_label: str | None = None
    """Extra label value put on every container (test suites clean up by it)."""

    sandbox: SandboxSettings = SandboxSettings()
    packages: PackageSettings = PackageSettings()
    package_cache: PackageCacheSettings = PackageCacheSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()

    @field_validator("run_code_tenant")
    @classmethod
    def _run_code_tenant_name(cls, value: str | None) -> str | None:
        if value is not None and not TENANT_PATTERN.match(value):
            raise ValueError("run_code_tenant must match [A-Za-z0-9_-]{1,64}")
        return value

    @field_validator("instance")
    @classmethod
    def _instance_name(cls, value: str) -> str:
        if not TENANT_PATTERN.match(value):
            raise ValueError("instance must match [A-Za-z0-9_-]{1,64}")
        return value

    @model_validator(mode="after")
    def _instance_is_a_label_value(self) -> Settings:
        # Kubernetes label values are at most 63 characters and start and end alphanumeric.
        if self.backend == "kubernetes" and not K8S_LABEL_VALUE.match(self.instance):
            raise ValueError("with the kubernetes backend, instance must be a label value (<= 63, alphanumeric ends)")
        return self

    @model_validator(mode="after")
    def _production_needs_keys(self) -> Settings:
        if self.mode == "production" and not self.key_map():
            raise ValueError("production mode needs ORCH_API_KEYS or ORCH_API_KEYS_FILE")
        if self.mode == "production" and self.backend == "local":
            raise ValueError("the local backend has no isolation and is refused in production mode")
        for tenant in self.key_map().values():
            if not TENANT_PATTERN.match(tenant):
                raise ValueError(f"tenant {tenant!r} must match [A-Za-z0-9_-]{{1,64}}")
        return self

    def key_map(self) -> dict[str, str]:
        """Configured API key -> tenant."""
        keys = dict(self.api_keys)
        if self.api_keys_file is not None:
            loaded = json.loads(self.api_keys_file.read_text())
            if not isinstance(loaded, dict):
                raise ValueError("the API keys file must hold a JSON object of key -> tenant")
            keys.update({str(k): str(v) for k, v in loaded.items()})
        return keys
