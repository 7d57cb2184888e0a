"""The benchmark's phases. Each starts what it needs, records figures in ``ctx.figures`` and stops it.

Phases run one after another, never overlapping, so no phase measures another's load.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.backends.docker import DockerBackend

from . import cpu, load, packages, peer
from .api import WarmSession, new_session_latencies
from .context import Context, figure
from .floor import FloorKernel, jupyter_throughput
from .memory import idle_session_memory
from .progress import say
from .runner import RunnerSandbox, kernel_starts
from .server import Server
from .stats import summarize

MiB = 1024 * 1024
KEY = "sk-bench"
# Several tenants, so that 100 live sessions fit the default per-tenant cap of 32.
KEYS = ("sk-bench-a", "sk-bench-b", "sk-bench-c", "sk-bench-d")
POOL_SIZE = 4


async def latency_and_pool(ctx: Context) -> None:
    """Figures 1-3 and 4a: floor vs runner vs HTTP (interleaved), kernel starts, pool hits."""
    server = ctx.start_server("pool", {"ORCH_POOL_SIZE": str(POOL_SIZE)})
    await latencies(ctx, server)
    backend = DockerBackend(ctx.settings("starts"))
    await backend.start()
    try:
        say(f"kernel starts: {ctx.plan.kernel_starts} sandboxes, one at a time")
        starts = await kernel_starts(backend, ctx.plan.kernel_starts, say)
    finally:
        await backend.close()
    ctx.figures["kernel_start_to_ready"] = figure(starts.start_to_ready, "s")
    ctx.figures["kernel_create_to_ready"] = figure(starts.create_to_ready, "s")
    ctx.figures["kernel_startup_runner"] = figure(starts.kernel_startup, "s")
    ctx.figures["kernel_start_call"] = figure(starts.start_call, "s")

    say(f"new sessions from a full pool of {POOL_SIZE}: {ctx.plan.pool_hits}")
    hits_before, misses_before = await asyncio.to_thread(server.pool_claims)
    samples = await asyncio.to_thread(
        new_session_latencies, server, KEY, ctx.plan.pool_hits, wait_for_pool=True, progress=say
    )
    hits_after, misses_after = await asyncio.to_thread(server.pool_claims)
    ctx.figures["new_session_pool"] = figure(samples, "s")
    hits, misses = hits_after - hits_before, misses_after - misses_before
    ctx.figures["pool_hit_rate"] = {"hits": hits, "misses": misses, "claims": hits + misses}
    ctx.stop_server(server)


async def latencies(ctx: Context, server: Server) -> None:
    """Floor, runner and warm HTTP round trips of ``print(1)``, in interleaved blocks."""
    plan = ctx.plan
    floor = FloorKernel(ctx.docker, ctx.settings("floor"))
    ctx.cleanup.callback(floor.close)
    backend = DockerBackend(ctx.settings("direct"))
    await backend.start()
    sandbox = RunnerSandbox(backend)
    warm: WarmSession | None = None
    try:
        say("latency: starting the floor kernel, a runner sandbox and an HTTP session")
        await asyncio.to_thread(floor.start)
        await sandbox.start()
        warm = await asyncio.to_thread(WarmSession, server, KEY)
        # Claiming the session took a warm sandbox; let the refill finish before measuring.
        await asyncio.to_thread(server.wait_pool_full)
        session = warm

        floor_cpu = {"seconds": 0.0, "executes": 0}

        async def floor_block(count: int) -> list[float]:
            # The floor kernel's own CPU per execute: the yardstick of the service's (figure 5b).
            before = cpu.snapshot()
            values = await asyncio.to_thread(floor.measure, count)
            floor_cpu["seconds"] += cpu.cpu_seconds(before, cpu.snapshot()).get("floor kernel", 0.0)
            floor_cpu["executes"] += count
            return values

        async def http_block(count: int) -> list[float]:
            return await asyncio.to_thread(session.measure, count)

        async def httpx_block(count: int) -> list[float]:
            return await asyncio.to_thread(functools.partial(session.measure, count, via_httpx=True))

        measures: dict[str, Callable[[int], Awaitable[list[float]]]] = {
            "floor": floor_block,
            "runner": sandbox.measure,
            "http_warm": http_block,
            "http_warm_httpx": httpx_block,
        }
        for measure in measures.values():
            await measure(plan.latency_warmup)
        sandbox.inside_ms.clear()
        floor_cpu.update(seconds=0.0, executes=0)
        samples: dict[str, list[float]] = {name: [] for name in measures}
        names = list(measures)
        for block in range(plan.latency_blocks):
            # Rotate the order so no path always runs first.
            turn = block % len(names)
            for name in names[turn:] + names[:turn]:
                samples[name] += await measures[name](plan.latency_block_size)
            medians = ", ".join(f"{n} {summarize(s).median * 1000:.2f} ms" for n, s in samples.items())
            say(f"latency block {block + 1}/{plan.latency_blocks}: running medians {medians}")
        for name, values in samples.items():
            ctx.figures[name] = figure(values, "ms", 1000)
        ctx.figures["runner_inside"] = figure(sandbox.inside_ms, "ms")
        ctx.figures["floor_start_seconds"] = floor.start_seconds
        ctx.figures["floor_kernel_cpu_ms"] = 1000 * floor_cpu["seconds"] / max(floor_cpu["executes"], 1)
    finally:
        if warm is not None:
            await asyncio.to_thread(warm.close)
        await sandbox.close()
        await backend.close()
        floor.close()


async def scale(ctx: Context) -> None:
    """Figures 4b, 5 and 6 on a server without a pool: cold starts, idle memory, throughput."""
    plan = ctx.plan
    most = max(max(plan.memory_levels), max(plan.throughput_levels))
    server = ctx.start_server("scale", {"ORCH_POOL_SIZE": "0", "ORCH_MAX_SESSIONS": str(most + 8)})
    say(f"cold new sessions (pool off): {plan.cold_starts}")
    cold = await asyncio.to_thread(
        new_session_latencies, server, KEY, plan.cold_starts, wait_for_pool=False, progress=say
    )
    ctx.figures["new_session_cold"] = figure(cold, "s")

    live: list[load.LiveSession] = []
    ctx.figures["memory"] = {}
    for level in plan.memory_levels:
        live += await load.create_sessions(server, KEYS, level - len(live), parallel=8, progress=say)
        memory = await asyncio.to_thread(idle_session_memory, ctx.docker, server.instance, [s.session_id for s in live])
        ctx.figures["memory"][str(level)] = {
            "usage": figure(memory.usage, "MiB", 1 / MiB),
            "rss": figure(memory.rss, "MiB", 1 / MiB),
            "cache": figure(memory.cache, "MiB", 1 / MiB),
            "working_set": figure(memory.working_set, "MiB", 1 / MiB),
        }
        say(f"memory at {level} idle sessions: median {summarize(memory.usage).median / MiB:.1f} MiB")

    needed = max(plan.throughput_levels)
    if len(live) < needed:
        live += await load.create_sessions(server, KEYS, needed - len(live), parallel=8, progress=say)
    elif len(live) > needed:
        await load.close_sessions(server, live[needed:])
        live = live[:needed]
    ctx.figures["throughput"] = {}
    for level in plan.throughput_levels:
        before = cpu.snapshot()
        result = await load.throughput(server, live[:level], plan.throughput_seconds)
        spent = cpu.cpu_seconds(before, cpu.snapshot())
        executes = max(result.completed_all, 1)
        ctx.figures["throughput"][str(level)] = {
            "cpu_ms_per_execute": {group: 1000 * seconds / executes for group, seconds in spent.items()},
            "per_second": result.per_second,
            "completed": result.completed,
            "seconds": result.seconds,
            "errors": dict(result.errors),
            "latency": figure(result.latencies, "ms", 1000),
        }
        say(f"throughput at {level} sessions: {result.per_second:.1f} exec/s, errors {dict(result.errors)}")
    await load.close_sessions(server, live)
    ctx.stop_server(server)
    # The target compares 16 sessions with 16 kernels; a plan without that level compares its largest.
    level = 16 if 16 in plan.throughput_levels else max(plan.throughput_levels)
    say(f"throughput of {level} raw Jupyter kernels, driven the same way")
    ctx.figures["jupyter_throughput"] = await asyncio.to_thread(
        jupyter_throughput, ctx.docker, ctx.settings("floor"), level, plan.throughput_seconds, load.SNIPPETS
    )
    say(f"raw Jupyter kernels at {level}: {ctx.figures['jupyter_throughput']['per_second']:.1f} exec/s")
    if 1 in plan.throughput_levels and level != 1:
        # Figure 5b at one session compares with one raw kernel driven the same way (same snippets, one
        # caller): the latency phase's floor runs print(1) alone, which costs a kernel more than x = 1.
        say("one raw Jupyter kernel, driven the same way (the CPU yardstick at one session)")
        ctx.figures["jupyter_single"] = await asyncio.to_thread(
            jupyter_throughput, ctx.docker, ctx.settings("floor"), 1, plan.throughput_seconds, load.SNIPPETS
        )


def peers(ctx: Context) -> None:
    """Figures 4c and 4d: ``docker run --rm`` and llm-sandbox, nothing of ours running."""
    plan = ctx.plan
    settings = ctx.settings("peer")
    say(f"docker run --rm: {plan.docker_runs}")
    ctx.figures["docker_run"] = figure(
        peer.docker_run_latencies(settings, ctx.work_dir, ctx.run_id, plan.docker_runs, say), "s"
    )
    try:
        python = peer.ensure_llm_sandbox(ctx.work_dir / "llm-sandbox-venv", say)
        say("llm-sandbox: stateless and interactive sessions")
        raw = peer.llm_sandbox(
            python,
            settings,
            ctx.run_id,
            sessions=plan.peer_sessions,
            runs=plan.peer_runs,
            interactive_sessions=plan.peer_interactive_sessions,
            interactive_runs=plan.peer_interactive_runs,
        )
    except Exception as exc:  # noqa: BLE001 - a broken peer must not sink our own figures
        ctx.figures["llm_sandbox"] = {"error": f"{type(exc).__name__}: {exc}"}
        return
    entry: dict[str, Any] = {key: raw[key] for key in ("version", "errors", "runtime_configs")}
    for name in ("stateless", "interactive"):
        if name in raw:
            entry[name] = {
                "new_session_to_result": figure(raw[name]["new_session_to_result"], "s"),
                "close": figure(raw[name]["close"], "s"),
                "run_in_open_session": figure(raw[name]["run_in_open_session"], "ms", 1000),
            }
    ctx.figures["llm_sandbox"] = entry


async def burst(ctx: Context) -> None:
    """Figure 7: simultaneous new sessions against a server with default settings (pool on)."""
    count = ctx.plan.burst_requests
    server = ctx.start_server("burst", {})
    await asyncio.to_thread(server.wait_pool_full)
    say(f"burst: {count} simultaneous new-session requests over {len(KEYS)} API keys")
    result = await load.burst(server, KEYS, count)
    say(f"burst: statuses {dict(result.statuses)}, transport errors {dict(result.transport_errors)}")
    deleted = await load.close_sessions(server, result.sessions)
    after_delete, _ = ctx.containers_of(server)
    server.stop()
    after_stop, pool_after_stop = ctx.containers_of(server)
    ctx.stop_server(server)
    ctx.figures["burst"] = {
        "requests": count,
        "statuses": {str(code): n for code, n in sorted(result.statuses.items())},
        "transport_errors": dict(result.transport_errors),
        "latency_all": figure(result.latencies_all, "s"),
        "latency_ok": figure(result.latencies_ok, "s"),
        "delete_statuses": {str(code): n for code, n in deleted.items()},
        "leftover_after_delete": after_delete,
        "leftover_session_containers": after_stop,
        "pool_containers_after_stop": pool_after_stop,
    }


async def package_installs(ctx: Context) -> None:
    """Figure 8: the same `!pip install` cold (through an empty cache) and cached; installs off."""
    count = ctx.plan.package_installs
    say(f"package installs: {count} cold/cached pairs of {', '.join(packages.PACKAGES)}")
    found = await asyncio.to_thread(
        packages.install_latencies, ctx.start_server, ctx.stop_server, ctx.work_dir, KEY, count, say
    )
    for kind, samples in found.items():
        ctx.figures[f"install_{kind}"] = figure(samples, "s")
    server = ctx.start_server("installs-off", {"ORCH_PACKAGES__ENABLED": "false"})
    try:
        ctx.figures["install_disabled"] = figure(
            await asyncio.to_thread(packages.disabled_latencies, server, KEY, max(count, 3)), "s"
        )
    finally:
        ctx.stop_server(server)
