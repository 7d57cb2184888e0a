"""Pure builder of the Docker ``containers.create`` arguments for one sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import index_gate
from ..settings import PackageSettings, SandboxSettings
from .channel import SOCKET_NAME

SANDBOX_UID_GID = "10001"
WORKDIR = "/workspace"
HOME = "/home/sandbox"
# PYTHONUSERBASE (the image sets it): inside the venv, so pip can uninstall what it installed there.
USER_PACKAGES = "/opt/venv/local"
# Where the sandbox sees its (read-only) runner socket directory.
CHANNEL_DIR = "/run/tci-runner"


# Bounds for the drivers that write the runner's log to the host's disk. "local" compresses rotated
# files by default, which the engine refuses with a single file; drivers that ship logs elsewhere
# take no size options.
_LOG_LIMITS: dict[str, dict[str, str]] = {
    "json-file": {"max-size": "1m", "max-file": "1"},
    "local": {"max-size": "1m", "max-file": "1", "compress": "false"},
}


def _tmpfs(size: int, *, owned: bool) -> str:
    # noexec stays off: native extensions pip installs into the home dir must be loadable.
    options = f"rw,nosuid,nodev,exec,size={size}"
    return f"{options},uid={SANDBOX_UID_GID},gid={SANDBOX_UID_GID},mode=0700" if owned else f"{options},mode=1777"


def runner_environment(sandbox: SandboxSettings) -> dict[str, str]:
    """The runner's settings; never anything secret (``/proc/1/environ`` is readable inside)."""
    return {
        "TCI_RUNNER_WORKDIR": WORKDIR,
        "TCI_RUNNER_MAX_STREAM_BYTES": str(sandbox.max_stream_bytes),
        "TCI_RUNNER_MAX_OUTPUT_BYTES": str(sandbox.max_output_bytes),
        # What a run_code request may add at the top of these is deleted after it (run lanes).
        "TCI_RUNNER_SCRUB_DIRS": f"{HOME}:/tmp:/dev/shm:{USER_PACKAGES}",
    }


def pip_environment(sandbox: SandboxSettings, packages: PackageSettings | None) -> dict[str, str]:
    """How pip inside the sandbox reaches the index: the gate's relay, or a fast, explicit refusal.

    ``packages`` None means no gate for this sandbox (installs off, or the attach channel).
    """
    if packages is not None:
        return {
            "PIP_INDEX_URL": index_gate.SANDBOX_INDEX_URL,
            # A cold file is fetched upstream by the cache before the first byte reaches pip.
            "PIP_TIMEOUT": str(int(packages.request_timeout_seconds) + 10),
            "PIP_RETRIES": "1",
            # The shared cache makes a per-session one pointless; it would only fill the home tmpfs.
            "PIP_NO_CACHE_DIR": "1",
            # No byte-compiling at install (half the time of a small install): modules compile
            # when imported. pip maps PIP_NO_<X> onto the positive option, so 0 means "no compile".
            "PIP_NO_COMPILE": "0",
            # Progress bars are cursor codes in a cell's captured stdout.
            "PIP_PROGRESS_BAR": "off",
            "PIP_NO_COLOR": "1",
            "TCI_RUNNER_INDEX_SOCKET": f"{CHANNEL_DIR}/{index_gate.SOCKET_NAME}",
            "TCI_RUNNER_INDEX_PORT": str(index_gate.SANDBOX_PORT),
        }
    if sandbox.network == "none":
        # Nothing listens there: pip fails at once, and its "Looking in indexes" line says why.
        return {"PIP_INDEX_URL": index_gate.DISABLED_INDEX_URL, "PIP_RETRIES": "0"}
    return {}  # egress configured on purpose: pip goes wherever the network lets it


def container_config(
    sandbox: SandboxSettings,
    *,
    name: str,
    labels: dict[str, str],
    seccomp_profile: str,
    channel_dir: Path | None = None,
    packages: PackageSettings | None = None,
    library: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``docker.models.containers.ContainerCollection.create``.

    Args:
        sandbox: limits and image.
        name: the container name (it records the session claim, see ``labels.py``).
        labels: ownership labels.
        seccomp_profile: the profile's JSON text (the Engine API takes content, not a path).
        channel_dir: the host directory holding this sandbox's runner socket, mounted read-only;
            None: the runner talks over its attached stdin/stdout instead.
        packages: the index gate's settings when the gate listens in ``channel_dir``; None: no
            package index for this sandbox.
        library: read-only volume mounts of the image's library trees (``library.Library.mounts``).
    """
    config: dict[str, Any] = {
        "image": sandbox.image,
        "name": name,
        "labels": labels,
        "detach": True,
        "stdin_open": channel_dir is None,
        "tty": False,
        "user": sandbox.user,
        "init": True,
        "network_mode": sandbox.network,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", f"seccomp={seccomp_profile}"],
        "read_only": True,
        "tmpfs": {
            "/tmp": _tmpfs(sandbox.tmp_bytes, owned=False),
            WORKDIR: _tmpfs(sandbox.workspace_bytes, owned=True),
            HOME: _tmpfs(sandbox.home_bytes, owned=True),
            USER_PACKAGES: _tmpfs(sandbox.packages_bytes, owned=True),
        },
        "mem_limit": sandbox.memory_bytes,
        "memswap_limit": sandbox.memory_bytes,
        "nano_cpus": int(sandbox.cpus * 1_000_000_000),
        "pids_limit": sandbox.pids,
        "ulimits": [
            {"Name": "nofile", "Soft": sandbox.nofile, "Hard": sandbox.nofile},
            {"Name": "fsize", "Soft": sandbox.max_file_size_bytes, "Hard": sandbox.max_file_size_bytes},
            {"Name": "core", "Soft": 0, "Hard": 0},
        ],
        "ipc_mode": "private",
        "shm_size": 64 * 1024 * 1024,
        "log_config": {"Type": sandbox.log_driver, "Config": _LOG_LIMITS.get(sandbox.log_driver, {})},
        "restart_policy": {"Name": "no"},
        # Only in a container: the ``run`` op restores these after each run (never a host's /tmp).
        "environment": runner_environment(sandbox),
        "working_dir": WORKDIR,
    }
    volumes = dict(library or {})
    if channel_dir is not None:
        volumes[str(channel_dir)] = {"bind": CHANNEL_DIR, "mode": "ro"}
        config["environment"]["TCI_RUNNER_SOCKET"] = f"{CHANNEL_DIR}/{SOCKET_NAME}"
    config["environment"].update(pip_environment(sandbox, packages if channel_dir is not None else None))
    if volumes:
        config["volumes"] = volumes
    if sandbox.runtime:
        config["runtime"] = sandbox.runtime
    return config
