"""The floor: a raw jupyter_client round trip to an IPython kernel in a hardened sandbox container.

The container is built from the orchestrator's own ``container_config`` (read-only root, no
capabilities, no-new-privileges, no network, uid 10001, tmpfs mounts, the same limits and seccomp
profile), with two changes: the entrypoint is ``ipykernel_launcher`` instead of the runner, and
one host temp dir is bind-mounted at ``/conn`` for a connection file with ZMQ's ``ipc``
transport. The kernel binds its sockets as files in that dir and the host's jupyter_client
connects through them, so no network is needed. What separates the floor from the product is
then exactly the runner, its channel and (for the API) the orchestrator.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
from jupyter_client.blocking.client import BlockingKernelClient

from orchestrator.backends import labels
from orchestrator.backends.docker import load_seccomp_profile
from orchestrator.backends.docker_spec import container_config
from orchestrator.settings import Settings

from . import cpu

_CONTAINER_DIR = "/conn"
_CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_START_TIMEOUT = 60.0
_REPLY_TIMEOUT = 30.0


class FloorKernel:
    """A bare kernel in a sandbox container, driven synchronously by ``BlockingKernelClient``."""

    def __init__(self, client: docker.DockerClient, settings: Settings) -> None:
        self._docker = client
        self._settings = settings
        self._dir = Path(tempfile.mkdtemp(prefix="tci-bench-floor-"))
        self._container: Any = None
        self._kc: BlockingKernelClient | None = None
        self.start_seconds = 0.0

    def start(self) -> None:
        """Start the container and connect; returns once the kernel answers ``kernel_info``."""
        # The container runs as uid 10001 and must create its socket files here.
        self._dir.chmod(0o777)
        ports = {f"{channel}_port": number for number, channel in enumerate(_CHANNELS, start=1)}
        info: dict[str, Any] = {
            "transport": "ipc",
            "ip": f"{_CONTAINER_DIR}/kernel",
            **ports,
            "key": secrets.token_hex(16),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "python3",
        }
        connection_file = self._dir / "kernel.json"
        connection_file.write_text(json.dumps(info))
        connection_file.chmod(0o644)

        instance = self._settings.instance
        config = container_config(
            self._settings.sandbox,
            name=f"tci.{instance}.floor.{secrets.token_hex(4)}",
            labels=labels.make_labels(
                instance, self._settings.sandbox.profile_key(), time.time(), self._settings.test_run_label
            ),
            seccomp_profile=load_seccomp_profile(self._settings),
        )
        config["stdin_open"] = False
        config["entrypoint"] = [
            "/opt/venv/bin/python",
            "-m",
            "ipykernel_launcher",
            "-f",
            f"{_CONTAINER_DIR}/kernel.json",
        ]
        config["volumes"] = {str(self._dir): {"bind": _CONTAINER_DIR, "mode": "rw"}}
        began = time.monotonic()
        self._container = self._docker.containers.create(**config)
        self._container.start()
        self._wait_for_sockets(began + _START_TIMEOUT)

        # Same connection, seen from the host: the socket files live in the bind-mounted dir.
        host_file = self._dir / "host.json"
        host_file.write_text(json.dumps({**info, "ip": str(self._dir / "kernel")}))
        kc = BlockingKernelClient(connection_file=str(host_file))
        kc.load_connection_file()
        kc.start_channels()
        kc.wait_for_ready(timeout=_START_TIMEOUT)
        self._kc = kc
        self.start_seconds = time.monotonic() - began

    def _wait_for_sockets(self, deadline: float) -> None:
        # jupyter_client's wait_for_ready treats a silent heartbeat as a dead kernel, so connect
        # only once the kernel has bound every socket (they appear as files in the shared dir).
        expected = {f"kernel-{number}" for number in range(1, len(_CHANNELS) + 1)}
        while not expected <= {path.name for path in self._dir.iterdir()}:
            self._container.reload()
            if self._container.status not in {"created", "running"}:
                raise RuntimeError(f"floor kernel container stopped ({self._container.status})")
            if time.monotonic() > deadline:
                raise RuntimeError("floor kernel did not bind its ipc sockets in time")
            time.sleep(0.02)

    def round_trip(self, code: str = "print(1)") -> float:
        """Seconds from ``execute`` to both the iopub ``idle`` status and the shell reply."""
        kc = self._kc
        assert kc is not None, "start() first"
        began = time.perf_counter()
        msg_id = kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        output = ""
        while True:
            msg = kc.get_iopub_msg(timeout=_REPLY_TIMEOUT)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                output += msg["content"]["text"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while kc.get_shell_msg(timeout=_REPLY_TIMEOUT)["parent_header"].get("msg_id") != msg_id:
            pass
        elapsed = time.perf_counter() - began
        if code == "print(1)" and output != "1\n":
            raise RuntimeError(f"floor kernel printed {output!r}")
        return elapsed

    def measure(self, count: int) -> list[float]:
        """``count`` round trips of ``print(1)``, in seconds."""
        return [self.round_trip() for _ in range(count)]

    def close(self) -> None:
        """Stop the client, remove the container and the temp dir (idempotent)."""
        if self._kc is not None:
            self._kc.stop_channels()
            self._kc = None
        if self._container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                self._container.remove(force=True, v=True)
            self._container = None
        shutil.rmtree(self._dir, ignore_errors=True)


def jupyter_throughput(
    client: docker.DockerClient, settings: Settings, kernels: int, seconds: float, snippets: tuple[str, ...]
) -> dict[str, Any]:
    """Executes per second of ``kernels`` floor kernels, one sequential worker each, for ``seconds``.

    Driven as ``load.throughput`` drives our sessions (the same snippets in turn, only executes that
    finish inside the window counted), so the two figures compare the kernels, not the drivers.
    """
    floors = [FloorKernel(client, settings) for _ in range(kernels)]
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(FloorKernel.start, floors))
        completed = 0
        lock = threading.Lock()
        before = cpu.snapshot()
        deadline = time.perf_counter() + seconds

        def worker(floor: FloorKernel, offset: int) -> None:
            nonlocal completed
            turn = offset
            while time.perf_counter() < deadline:
                floor.round_trip(snippets[turn % len(snippets)])
                turn += 1
                if time.perf_counter() <= deadline:
                    with lock:
                        completed += 1

        with ThreadPoolExecutor(kernels) as pool:
            list(pool.map(worker, floors, range(kernels)))
        spent = cpu.cpu_seconds(before, cpu.snapshot())
    finally:
        for floor in floors:
            floor.close()
    return {
        "kernels": kernels,
        "per_second": completed / seconds,
        "completed": completed,
        "seconds": seconds,
        "cpu_ms_per_execute": {group: 1000 * value / max(completed, 1) for group, value in spent.items()},
    }
