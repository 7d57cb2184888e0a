"""``python -m bench [--quick] [--only PHASE] [--image IMAGE] [--out FILE]``: run, print the table, write JSON.

Everything the benchmark starts carries one run id: orchestrator servers get it as their test-run
label, and every container (ours, the servers', llm-sandbox's) is labelled with it, so the
``finally`` below removes them all, on success, failure, Ctrl-C or SIGTERM alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orchestrator.backends import labels, library
from orchestrator.logging import configure_logging
from orchestrator.settings import SandboxSettings

from . import engine, interrupt, neighbours, phases, run_code
from .context import Context
from .plan import FULL, QUICK
from .progress import elapsed, say
from .report import render

WORK_DIR = Path(".bench")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run of every phase")
    parser.add_argument("--only", action="append", metavar="PHASE", help="run only this phase (repeatable)")
    parser.add_argument("--out", type=Path, default=WORK_DIR / "results.json", help="where to write the JSON")
    parser.add_argument("--image", default=SandboxSettings().image, help="the sandbox image (make bench passes IMAGE)")
    parser.add_argument(
        "--soak", type=float, metavar="MINUTES", help="only the soak: mixed work for MINUTES (not for CI; try 30)"
    )
    return parser.parse_args(argv)


def _sweep_stale(ctx: Context) -> None:
    """Remove containers of earlier runs that were killed before their own cleanup could run."""
    stale = [
        c
        for c in engine.labelled(ctx.docker, labels.TEST_RUN)
        if (c.labels or {}).get(labels.TEST_RUN, "").startswith("bench")
    ]
    for container in stale:
        container.remove(force=True, v=True)
    if stale:
        say(f"removed {len(stale)} containers left by earlier benchmark runs")


async def _run_phases(ctx: Context, errors: dict[str, str], only: list[str] | None, soak: float | None) -> None:
    async def in_thread(fn: Callable[[Context], None]) -> None:
        await asyncio.to_thread(fn, ctx)

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("latency_and_pool", lambda: phases.latency_and_pool(ctx)),
        ("scale", lambda: phases.scale(ctx)),
        ("peers", lambda: in_thread(phases.peers)),
        ("burst", lambda: phases.burst(ctx)),
        ("package_installs", lambda: phases.package_installs(ctx)),
        ("run_code", lambda: run_code.run_code(ctx)),
        ("neighbours", lambda: neighbours.neighbours(ctx)),
        ("storm", lambda: neighbours.storm(ctx)),
    ]
    if soak is not None:
        steps = [("soak", lambda: neighbours.soak(ctx, soak))]
    for name, step in steps:
        if only and name not in only:
            continue
        say(f"== phase {name}")
        began = time.monotonic()
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - record it, clean up, and go on with the next phase
            errors[f"phase {name} failed"] = f"{type(exc).__name__}: {exc}"
            say(f"phase {name} FAILED:\n{traceback.format_exc()}")
            # Servers a failed phase started must not load the next phase.
            for server in list(ctx.servers):
                ctx.stop_server(server)
        say(f"== phase {name} done in {time.monotonic() - began:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # The backend used in-process logs every container it removes; only problems matter here.
    configure_logging("console", "WARNING")
    plan = QUICK if args.quick else FULL
    # The benchmark owns its configuration: settings built here must equal the servers' defaults.
    dropped = sorted(key for key in os.environ if key.startswith("ORCH_"))
    for key in dropped:
        del os.environ[key]
    WORK_DIR.mkdir(exist_ok=True)
    run_id = "bench" + secrets.token_hex(4)
    ctx = Context(run_id=run_id, plan=plan, work_dir=WORK_DIR.resolve(), docker=engine.connect(), image=args.image)
    image = ctx.settings("meta").sandbox.image
    # Every sandbox of the run alike: none made from the image alone while the servers fill the set.
    say(f"library volumes of {image}: filling if missing")
    library.prepare(ctx.docker, image)
    results: dict[str, Any] = {
        "meta": {
            "mode": "soak" if args.soak is not None else "quick" if args.quick else "full",
            "run_id": run_id,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": engine.host_facts(ctx.docker, image),
            "plan": plan.to_json(),
            "load_before": engine.load_average(),
            "dropped_environment": dropped,
        },
        "figures": ctx.figures,
        "errors": {},
    }
    say(f"benchmark run {run_id} ({results['meta']['mode']}); load average {results['meta']['load_before']}")
    if dropped:
        say(f"ignoring {', '.join(dropped)}: the benchmark sets its own configuration")
    interrupt.install()
    interrupted = False
    try:
        _sweep_stale(ctx)
        asyncio.run(_run_phases(ctx, results["errors"], args.only, args.soak))
    except KeyboardInterrupt:
        interrupted = True
        results["errors"]["interrupted"] = "stopped by a signal; figures are partial"
        say("interrupted: cleaning up")
    finally:
        removed = ctx.close()
        left = len(engine.labelled(ctx.docker, engine.run_label(run_id)))
        say(f"cleanup: removed {removed} containers; {left} of this run remain")
        results["meta"].update(
            {
                "load_after": engine.load_average(),
                "duration_seconds": elapsed(),
                "removed_at_cleanup": removed,
                "remaining_after_cleanup": left,
            }
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))
        table = render(results)
        args.out.with_suffix(".txt").write_text(table + "\n")
        print("\n" + table, flush=True)
        say(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    return 1 if interrupted or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
