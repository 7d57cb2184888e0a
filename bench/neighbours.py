"""Figures 8-10: a bystander next to runaway code, a storm of new sessions, and (``--soak``) a long mixed run.

The bystander is one warm session measured alone first (its own baseline) and then while a
neighbour session of another tenant runs one runaway after another (bombs, hogs, threads);
the figure is the ratio of the two medians. Every bystander reply is checked, so a lost or wrong
answer fails the phase instead of passing as a fast one.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from . import load
from .api import WarmSession, client_for, close_session, execute
from .context import Context, figure
from .progress import say
from .server import Server
from .stats import summarize

BOMB = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"
# What the neighbour runs over and over; each is stopped by the sandbox, some restart its kernel.
RUNAWAYS = (
    f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {BOMB!r}])\ntime.sleep(3)",
    BOMB,
    "!for i in 1 2 3 4 5 6 7 8; do (yes > /dev/null &); done\nimport time; time.sleep(3)",
    "!bash -c ':(){ :|:& };:'",
    "import threading, time\ntry:\n    while True: threading.Thread(target=time.sleep, args=(60,)).start()\n"
    "except RuntimeError:\n    pass",
)
STORM_TENANTS = 20
# Soak clients, each holding at most one session at a time: more containers than this is a leak.
SOAK_WORKERS = 6


class Neighbour(threading.Thread):
    """Runs ``RUNAWAYS`` in a loop in a session of its own until stopped."""

    def __init__(self, server: Server, key: str) -> None:
        super().__init__(daemon=True)
        self._client = client_for(server, key)
        self.stop = threading.Event()
        self.cycles = 0
        self.outcomes: Counter[str] = Counter()
        self.error: str | None = None

    def run(self) -> None:
        session_id: str | None = None
        try:
            while not self.stop.is_set():
                for code in RUNAWAYS:
                    data = execute(self._client, code, session_id)
                    session_id = data["session_id"]
                    self.outcomes[data["outcome"]] += 1
                    if self.stop.is_set():
                        break
                else:
                    self.cycles += 1
        except Exception as exc:  # noqa: BLE001 - reported with the figure
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if session_id is not None:
                close_session(self._client, session_id)
            self._client.close()


async def neighbours(ctx: Context) -> None:
    """Figure 8: the bystander's warm execute, alone and beside runaways."""
    count = ctx.plan.neighbour_samples
    server = ctx.start_server("neighbours", {"ORCH_POOL_SIZE": "0"})
    bystander = await asyncio.to_thread(WarmSession, server, "sk-bench-bystander")
    try:
        await asyncio.to_thread(bystander.measure, 20)
        say(f"neighbours: bystander baseline, {count} executes")
        baseline = await asyncio.to_thread(bystander.measure, count)
        neighbour = Neighbour(server, "sk-bench-neighbour")
        neighbour.start()
        say("neighbours: bystander beside runaways, until one full cycle of them and as many executes")
        beside: list[float] = []
        while (len(beside) < count or neighbour.cycles < 1) and neighbour.is_alive():
            beside += await asyncio.to_thread(bystander.measure, 10)
        neighbour.stop.set()
        await asyncio.to_thread(neighbour.join)
    finally:
        await asyncio.to_thread(bystander.close)
    ratio = summarize(beside).median / summarize(baseline).median
    say(f"neighbours: bystander p50 ratio {ratio:.2f}, neighbour outcomes {dict(neighbour.outcomes)}")
    ctx.figures["neighbours"] = {
        "baseline": figure(baseline, "ms", 1000),
        "beside_runaways": figure(beside, "ms", 1000),
        "ratio_p50": ratio,
        "runaway_cycles": neighbour.cycles,
        "neighbour_outcomes": dict(neighbour.outcomes),
        "neighbour_error": neighbour.error,
    }
    ctx.stop_server(server)


async def storm(ctx: Context) -> None:
    """Figure 9: ``storm_requests`` simultaneous new sessions over 20 tenants, default settings."""
    count = ctx.plan.storm_requests
    keys = tuple(f"sk-bench-storm-{index}" for index in range(STORM_TENANTS))
    server = ctx.start_server("storm", {})
    await asyncio.to_thread(server.wait_pool_full)
    say(f"storm: {count} simultaneous new-session requests over {len(keys)} tenants")
    result = await load.burst(server, keys, count)
    say(f"storm: statuses {dict(result.statuses)}, transport errors {dict(result.transport_errors)}")
    await load.close_sessions(server, result.sessions)
    leftovers = ctx.session_leftovers(server)
    ctx.figures["storm"] = {
        "requests": count,
        "tenants": len(keys),
        "statuses": {str(code): n for code, n in sorted(result.statuses.items())},
        "transport_errors": dict(result.transport_errors),
        "retry_after_missing": result.retry_after_missing,
        "latency_all": figure(result.latencies_all, "s"),
        "leftover_session_containers": leftovers,
    }


@dataclass
class Samples:
    """The orchestrator process and its containers, sampled over a soak."""

    seconds: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    containers: list[int] = field(default_factory=list)

    def take(self, began: float, pid: int, containers: int) -> None:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        status = dict(line.split(":", 1) for line in lines if ":" in line)
        self.seconds.append(time.monotonic() - began)
        self.rss.append(int(status["VmRSS"].split()[0]) * 1024)
        self.threads.append(int(status["Threads"]))
        self.fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        self.containers.append(containers)

    def growth(self) -> dict[str, float]:
        """Median of the last quarter over the median of the second quarter (after warm-up), minus 1."""
        quarter = max(len(self.rss) // 4, 1)

        def grown(values: list[int]) -> float:
            early = summarize([float(v) for v in values[quarter : 2 * quarter] or values]).median
            late = summarize([float(v) for v in values[-quarter:]]).median
            return late / early - 1 if early else 0.0

        return {name: grown(getattr(self, name)) for name in ("rss", "fds", "threads", "containers")}


async def soak(ctx: Context, minutes: float) -> None:
    """Figure 10 (``--soak``): mixed work for ``minutes``; the orchestrator must not grow."""
    server = ctx.start_server("soak", {"ORCH_SESSION_LIFESPAN_SECONDS": "120", "ORCH_REAPER_INTERVAL_SECONDS": "5"})
    pid = server.pid
    began = time.monotonic()
    deadline = began + minutes * 60
    samples = Samples()
    counts: Counter[str] = Counter()
    rng = random.Random(0)

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        key = f"sk-bench-soak-{index % 4}"
        session: str | None = None
        while time.monotonic() < deadline:
            roll = rng.random()
            code = rng.choice(RUNAWAYS) if roll < 0.02 else rng.choice(("x = 1", "print(1)", "sum(range(10**5))"))
            body: dict[str, Any] = {"code": code, "language": "python"}
            if session is not None:
                body["session_id"] = session
            response = await client.post("/tci/execute", json=body, headers={"Authorization": f"Bearer {key}"})
            counts[str(response.status_code)] += 1
            if response.status_code != 200:
                session = None  # expired (404) or refused (429): start again
                await asyncio.sleep(1)
                continue
            session = response.json()["data"]["session_id"]
            if index % 3 and roll > 0.97:  # end it early now and then; every third client's sessions expire
                await client.delete(f"/tci/sessions/{session}", headers={"Authorization": f"Bearer {key}"})
                counts["deleted"] += 1
                session = None
        if session is not None:
            await client.delete(f"/tci/sessions/{session}", headers={"Authorization": f"Bearer {key}"})

    async def sampler() -> None:
        while time.monotonic() < deadline:
            containers, _ = await asyncio.to_thread(ctx.containers_of, server)
            samples.take(began, pid, containers)
            say(
                f"soak {samples.seconds[-1] / 60:.1f} min: rss {samples.rss[-1] / 2**20:.1f} MiB, "
                f"fds {samples.fds[-1]}, threads {samples.threads[-1]}, containers {containers}, {dict(counts)}"
            )
            await asyncio.sleep(30)

    async with load.async_client(server, SOAK_WORKERS + 2) as client:
        await asyncio.gather(sampler(), *(worker(index, client) for index in range(SOAK_WORKERS)))
    growth = samples.growth()
    say(f"soak: growth {', '.join(f'{k} {v:+.1%}' for k, v in growth.items())}")
    leftovers = ctx.session_leftovers(server)
    ctx.figures["soak"] = {
        "minutes": minutes,
        "requests": dict(counts),
        "growth": growth,
        "workers": SOAK_WORKERS,
        "max_containers": max(samples.containers, default=0),
        "samples": {name: getattr(samples, name) for name in ("seconds", "rss", "fds", "threads", "containers")},
        "leftover_session_containers": leftovers,
    }
