"""Peers for "new session → first result": ``docker run --rm`` (the engine's floor) and llm-sandbox.

llm-sandbox lives in its own virtualenv under ``.bench/`` (installed with pip on first use) and
is driven by ``peer_llm_sandbox.py`` in a subprocess that prints JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.backends import labels
from orchestrator.backends.docker import load_seccomp_profile
from orchestrator.backends.docker_spec import container_config
from orchestrator.settings import Settings

from .interrupt import run_child

LLM_SANDBOX_VERSION = "0.3.46"
_PEER_SCRIPT = Path(__file__).with_name("peer_llm_sandbox.py")
_INSTALL_TIMEOUT = 900.0
_PEER_TIMEOUT = 1200.0


def docker_run_argv(settings: Settings, seccomp_file: Path, run_id: str) -> list[str]:
    """``docker run --rm`` with exactly the flags a session container gets, running ``print(1)``.

    Built from the orchestrator's ``container_config`` so the two cannot drift apart.
    """
    config = container_config(settings.sandbox, name="unused", labels={}, seccomp_profile="")
    argv = ["docker", "run", "--rm", "--init", "--read-only", "--user", config["user"]]
    argv += ["--network", config["network_mode"], "--label", f"{labels.TEST_RUN}={run_id}"]
    argv += [flag for cap in config["cap_drop"] for flag in ("--cap-drop", cap)]
    argv += ["--security-opt", "no-new-privileges:true", "--security-opt", f"seccomp={seccomp_file}"]
    argv += ["--memory", str(config["mem_limit"]), "--memory-swap", str(config["memswap_limit"])]
    argv += ["--cpus", f"{config['nano_cpus'] / 1e9:g}", "--pids-limit", str(config["pids_limit"])]
    for limit in config["ulimits"]:
        argv += ["--ulimit", f"{limit['Name']}={limit['Soft']}:{limit['Hard']}"]
    for path, options in config["tmpfs"].items():
        argv += ["--tmpfs", f"{path}:{options}"]
    argv += ["--ipc", config["ipc_mode"], "--shm-size", str(config["shm_size"])]
    argv += ["--log-driver", config["log_config"]["Type"], "--workdir", config["working_dir"]]
    for key, value in config["environment"].items():
        argv += ["--env", f"{key}={value}"]
    if "runtime" in config:
        argv += ["--runtime", config["runtime"]]
    argv += ["--entrypoint", "/opt/venv/bin/python", config["image"], "-c", "print(1)"]
    return argv


def docker_run_latencies(
    settings: Settings, work_dir: Path, run_id: str, count: int, progress: Callable[[str], None]
) -> list[float]:
    """Seconds for ``docker run --rm … python -c 'print(1)'`` to exit (CLI start to container gone)."""
    seccomp_file = work_dir / "seccomp.json"
    seccomp_file.write_text(load_seccomp_profile(settings))
    argv = docker_run_argv(settings, seccomp_file, run_id)
    samples: list[float] = []
    for index in range(count):
        began = time.perf_counter()
        done = run_child(argv, timeout=120)
        elapsed = time.perf_counter() - began
        if done.returncode != 0 or done.stdout != "1\n":
            raise RuntimeError(f"docker run failed ({done.returncode}): {done.stdout!r} {done.stderr[-500:]}")
        samples.append(elapsed)
        progress(f"docker run {index + 1}/{count}: {elapsed:.3f} s")
    return samples


def ensure_llm_sandbox(venv: Path, progress: Callable[[str], None]) -> Path:
    """The python of ``venv`` with ``llm-sandbox[docker]==LLM_SANDBOX_VERSION``, installed if needed."""
    python = venv / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('llm-sandbox'))"
    if python.exists():
        found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
        if found.returncode == 0 and found.stdout.strip() == LLM_SANDBOX_VERSION:
            return python
    progress(f"installing llm-sandbox {LLM_SANDBOX_VERSION} into {venv.name} (first run only)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=_INSTALL_TIMEOUT)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"llm-sandbox[docker]=={LLM_SANDBOX_VERSION}",
        ],
        check=True,
        timeout=_INSTALL_TIMEOUT,
    )
    return python


def llm_sandbox(
    python: Path,
    settings: Settings,
    run_id: str,
    *,
    sessions: int,
    runs: int,
    interactive_sessions: int,
    interactive_runs: int,
) -> dict[str, Any]:
    """Run ``peer_llm_sandbox.py`` in the llm-sandbox venv; its JSON result (seconds)."""
    options = {
        "image": settings.sandbox.image,
        "memory_bytes": settings.sandbox.memory_bytes,
        "cpus": settings.sandbox.cpus,
        "pids": settings.sandbox.pids,
        "label_key": labels.TEST_RUN,
        "label_value": run_id,
        "sessions": sessions,
        "runs": runs,
        "interactive_sessions": interactive_sessions,
        "interactive_runs": interactive_runs,
    }
    # stderr is inherited: the peer's progress lines show up as it goes.
    done = run_child([str(python), str(_PEER_SCRIPT), json.dumps(options)], timeout=_PEER_TIMEOUT, capture_stderr=False)
    if done.returncode != 0:
        raise RuntimeError(f"llm-sandbox peer exited with {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result
