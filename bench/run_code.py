"""Figure 9: SandboxFusion's ``/run_code`` under RL-style load, beside ``docker run --rm`` per request.

Steady state: ``run_code_callers`` callers post ``print(1)`` back to back for ``throughput_seconds``
after a warm-up that opens their run lanes. Burst: ``run_code_burst`` requests at once, where the
only acceptable non-200 answer is a 504 (nothing ran; verl retries it), and nothing may be left on
the engine once the server stops. The comparison is a fresh hardened container per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import Counter
from typing import Any

import httpx

from . import peer
from .context import Context, figure
from .interrupt import run_child
from .load import async_client
from .progress import say
from .server import Server

_BODY = {"code": "print(1)", "language": "python"}


async def _post(client: httpx.AsyncClient) -> tuple[int, float, bool]:
    began = time.perf_counter()
    response = await client.post("/run_code", json=_BODY)
    elapsed = time.perf_counter() - began
    ok = response.status_code == 200 and response.json().get("run_result", {}).get("stdout") == "1\n"
    return response.status_code, elapsed, ok


async def _steady(server: Server, callers: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    wrong = 0
    async with async_client(server, callers) as client:
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal wrong
            while time.perf_counter() < deadline:
                status, elapsed, ok = await _post(client)
                statuses[status] += 1
                latencies.append(elapsed)
                wrong += not ok

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        wall = time.perf_counter() - began
    return {
        "callers": callers,
        "seconds": wall,
        "per_second": len(latencies) / wall,
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "wrong_output": wrong,
        "latency": figure(latencies, "s"),
    }


async def _burst(server: Server, count: int) -> dict[str, Any]:
    statuses: Counter[int] = Counter()
    transport: Counter[str] = Counter()
    latencies: list[float] = []
    async with async_client(server, count) as client:

        async def one() -> None:
            try:
                status, elapsed, _ = await _post(client)
            except httpx.HTTPError as exc:
                transport[type(exc).__name__] += 1
                return
            statuses[status] += 1
            latencies.append(elapsed)

        await asyncio.gather(*(one() for _ in range(count)))
    return {
        "requests": count,
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "transport_errors": dict(transport),
        "latency": figure(latencies, "s"),
    }


def _docker_runs(ctx: Context, callers: int, count: int) -> dict[str, Any]:
    """``docker run --rm`` per request: one at a time (latency), then ``callers`` at once (rate)."""
    settings = ctx.settings("docker-run")
    serial = peer.docker_run_latencies(settings, ctx.work_dir, ctx.run_id, count, lambda _: None)
    seccomp = ctx.work_dir / "seccomp.json"
    argv = peer.docker_run_argv(settings, seccomp, ctx.run_id)
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        done = list(pool.map(lambda _: run_child(argv, timeout=300).returncode, range(count)))
    wall = time.perf_counter() - began
    return {
        "latency": figure(serial, "s"),
        "concurrent_callers": callers,
        "concurrent_per_second": count / wall,
        "concurrent_failures": sum(1 for code in done if code != 0),
    }


async def run_code(ctx: Context) -> None:
    """Throughput and burst of ``/run_code``; ``docker run`` per request alongside."""
    plan = ctx.plan
    callers = plan.run_code_callers
    server = ctx.start_server("runcode", {"ORCH_RUN_CODE_SANDBOXES": str(callers)})
    await asyncio.to_thread(server.wait_pool_full)
    say(f"run_code: warming {callers} run lanes")
    await _steady(server, callers, 5.0)
    say(f"run_code: {callers} callers for {plan.throughput_seconds:g} s")
    steady = await _steady(server, callers, plan.throughput_seconds)
    say(f"run_code: {steady['per_second']:.1f}/s, statuses {steady['statuses']}")
    say(f"run_code: burst of {plan.run_code_burst}")
    burst = await _burst(server, plan.run_code_burst)
    say(f"run_code: burst statuses {burst['statuses']}, transport errors {burst['transport_errors']}")
    server.stop()
    burst["leftover_session_containers"], burst["pool_containers_after_stop"] = ctx.containers_of(server)
    ctx.stop_server(server)
    say("run_code: docker run --rm per request")
    docker_run = await asyncio.to_thread(_docker_runs, ctx, callers, plan.docker_runs)
    ctx.figures["run_code"] = {"steady": steady, "burst": burst, "docker_run": docker_run}
