"""Runs one corpus of cells on a Jupyter kernel and on the runner's interpreter, inside a sandbox container.

Started by ``test_fidelity.py`` as ``python fidelity_driver.py CORPUS.json`` in the sandbox image: the
Jupyter side is ipykernel driven by jupyter_client (as any Jupyter-based code interpreter runs it),
the other the runner's own supervisor and interpreter. Both kernels' messages go through the same
``OutputCollector``, so what is compared is exactly what a TCI caller would receive. Prints one JSON
object: cell id -> {"jupyter": outputs, "lean": outputs}.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from jupyter_client.manager import start_new_kernel
from sandbox_runner.__main__ import kernel_env, make_directories, seed_matplotlib
from sandbox_runner.config import RunnerConfig
from sandbox_runner.kernel import KernelSupervisor
from sandbox_runner.outputs import OutputCollector

TIMEOUT = 60.0
# The report's line starts with this (anything else a kernel leaks onto the container's stdout is ignored).
MARKER = "FIDELITY-REPORT:"


def run_jupyter(cells: list[dict[str, str]], env: dict[str, str], config: RunnerConfig) -> dict[str, Any]:
    os.environ.clear()
    os.environ.update(env)
    # The kernel's own stdout is not the driver's: only what it captures and sends may be compared.
    manager, client = start_new_kernel(
        kernel_name="python3", cwd=str(config.workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results: dict[str, Any] = {}
    try:
        for cell in cells:
            if not manager.is_alive():
                results[cell["id"]] = None
                continue
            collector = OutputCollector(config.limits)
            msg_id = client.execute(cell["code"], allow_stdin=False, stop_on_error=True)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    msg = client.get_iopub_msg(timeout=1)
                except Exception:  # noqa: BLE001 - queue.Empty, or the kernel is gone
                    if not manager.is_alive():
                        break
                    continue
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "status":
                    if msg["content"]["execution_state"] == "idle":
                        break
                    continue
                collector.feed(msg["msg_type"], msg["content"])
            results[cell["id"]] = collector.finish()
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return results


async def run_lean(cells: list[dict[str, str]], env: dict[str, str], config: RunnerConfig) -> dict[str, Any]:
    supervisor = KernelSupervisor(config, env)
    await supervisor.start()
    results: dict[str, Any] = {}
    try:
        for cell in cells:
            outcome = await supervisor.execute(cell["code"], TIMEOUT)
            results[cell["id"]] = outcome.outputs
    finally:
        await supervisor.shutdown()
    return results


def main() -> None:
    with open(sys.argv[1]) as handle:
        cells = json.load(handle)
    config = RunnerConfig.from_env()
    make_directories(config)
    seed_matplotlib(config)
    env = kernel_env(config)
    os.chdir(config.workdir)
    lean = asyncio.run(run_lean(cells, env, config))
    jupyter = run_jupyter(cells, env, config)
    report = {cell["id"]: {"jupyter": jupyter[cell["id"]], "lean": lean[cell["id"]]} for cell in cells}
    print(MARKER + json.dumps(report))


if __name__ == "__main__":
    main()
