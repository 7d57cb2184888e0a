"""llm-sandbox measurements. Runs INSIDE the llm-sandbox virtualenv (``bench/peer.py`` starts it).

Usage: ``python peer_llm_sandbox.py '<json options>'``; prints one JSON object on stdout and
progress on stderr. It imports nothing from this repository: that venv holds only llm-sandbox.

Configuration, chosen as llm-sandbox's fastest that works offline with our image:
- Docker backend, image ``tci-sandbox:latest``, ``skip_environment_setup=True`` (its setup makes a
  venv and upgrades pip from the network; our image has no ensurepip and sessions no network).
- ``runtime_configs``: the same memory/cpu/pids limits and ``network_mode: none`` as our sandboxes;
  entrypoint ``sleep infinity`` because the image's own entrypoint (our runner) exits when its
  stdin is closed, and ``init`` so that llm-sandbox's ``container.stop()`` is not a 10 s SIGTERM
  timeout on a PID 1 that ignores it. Everything else is llm-sandbox's default: it runs as root
  on a writable root filesystem, because ``run`` copies each snippet into the container with the
  archive API, which cannot write to a read-only root.
- ``InteractiveSandboxSession`` would ``pip install ipython`` into its own venv on open; that needs
  the network and a pip the image does not have, so ``OfflineInteractive`` skips that step and runs
  its kernel script with the image's Python, which ships IPython.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

from llm_sandbox import InteractiveSandboxSession, SandboxSession

IMAGE_PYTHON = "/opt/venv/bin/python"


class OfflineInteractive(InteractiveSandboxSession):  # type: ignore[misc]  # untyped outside its venv
    """The interactive session minus its online dependency install (IPython is in the image)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._python_exec_path = IMAGE_PYTHON

    def _ensure_runtime_dependencies(self) -> None:
        self.execute_commands([(f"mkdir -p {self._commands_dir} {self._results_dir}", None)])


def log(message: str) -> None:
    print(f"  [llm-sandbox] {message}", file=sys.stderr, flush=True)


def runtime_configs(options: dict[str, Any]) -> dict[str, Any]:
    memory = int(options["memory_bytes"])
    return {
        "entrypoint": ["sleep", "infinity"],
        "init": True,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": int(float(options["cpus"]) * 1_000_000_000),
        "pids_limit": int(options["pids"]),
        "network_mode": "none",
        "labels": {options["label_key"]: options["label_value"]},
    }


def check(output: Any) -> None:
    if output.exit_code != 0 or output.stdout != "1\n":
        raise RuntimeError(f"print(1) gave exit {output.exit_code}, stdout {output.stdout!r}, stderr {output.stderr!r}")


def measure_sessions(
    make: Callable[[], Any], count: int, runs: int, label: str
) -> tuple[list[float], list[float], list[float]]:
    """(open→first result, close, per-run latencies in the first session) in seconds."""
    first: list[float] = []
    closes: list[float] = []
    per_run: list[float] = []
    for index in range(count):
        began = time.perf_counter()
        session = make()
        session.open()
        try:
            result = session.run("print(1)")
            first.append(time.perf_counter() - began)
            check(result)
            if index == 0:
                # Per-run latency inside an already open session (its first run was just done).
                for _ in range(runs):
                    run_began = time.perf_counter()
                    result = session.run("print(1)")
                    per_run.append(time.perf_counter() - run_began)
                    check(result)
                log(f"{label}: {runs} runs in an open session, median {sorted(per_run)[len(per_run) // 2]:.3f} s")
        finally:
            close_began = time.perf_counter()
            session.close()
            closes.append(time.perf_counter() - close_began)
        log(f"{label}: new session {index + 1}/{count}: {first[-1]:.3f} s to first result")
    return first, closes, per_run


def main() -> None:
    options = json.loads(sys.argv[1])
    configs = runtime_configs(options)
    out: dict[str, Any] = {"version": metadata.version("llm-sandbox"), "runtime_configs": configs, "errors": {}}

    def stateless() -> Any:
        return SandboxSession(
            lang="python", image=options["image"], skip_environment_setup=True, runtime_configs=dict(configs)
        )

    def interactive() -> Any:
        return OfflineInteractive(
            lang="python",
            image=options["image"],
            skip_environment_setup=True,
            max_memory=None,
            runtime_configs=dict(configs),
        )

    for name, make, count, runs in (
        ("stateless", stateless, int(options["sessions"]), int(options["runs"])),
        ("interactive", interactive, int(options["interactive_sessions"]), int(options["interactive_runs"])),
    ):
        try:
            first, closes, per_run = measure_sessions(make, count, runs, name)
        except Exception as exc:  # noqa: BLE001 - report the failure, keep the other measurement
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} failed:\n{traceback.format_exc()}")
            continue
        out[name] = {"new_session_to_result": first, "close": closes, "run_in_open_session": per_run}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
