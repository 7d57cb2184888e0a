"""SandboxFusion's routes (``/run_code``, ``/run_jupyter``, ``/v1/ping``) for RL reward loops.

A thin adapter: sessions come from ``SessionManager`` (run lanes for ``/run_code``, a fresh session
per ``/run_jupyter``), the mapping lives in ``sandbox_fusion.py``. Execution outcomes are always a
200; a request that finds every sandbox busy gets a 504 with ``Retry-After``, the one status verl
retries, and a malformed one a 422. Calls without an ``Authorization`` header run as
``run_code_tenant`` (dev mode: "sandbox-fusion"; production mode without it: 401).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from ..errors import CapacityExhausted, InvalidRequest, OrchestratorError, Saturated, Unauthorized
from ..runner_client import FetchResult, RunResult
from ..sandbox_fusion import (
    CellRunResult,
    CommandRunResult,
    CommandRunStatus,
    RunCodeRequest,
    RunCodeResponse,
    RunJupyterRequest,
    RunJupyterResponse,
    program_for,
    run_code_response,
    sandbox_error,
    uploads,
    with_dropped_files,
)
from ..sandbox_fusion import cell_result as to_cell
from ..schemas import ErrorEnvelope
from ..sessions import Session
from .deps import ServicesDep
from .responses import TCIJSONResponse

DEV_TENANT = "sandbox-fusion"
_MiB = 2**20
_FETCH_TIMEOUT = 10.0
# Outcomes after which the kernel is not the one the earlier cells ran in.
_BROKEN = frozenset({"oom", "kernel_died", "sandbox_lost", "not_run"})
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorEnvelope} for code in (401, 413, 422, 504)}

router = APIRouter(tags=["SandboxFusion"], default_response_class=TCIJSONResponse)


async def get_fusion_tenant(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> str:
    if authorization is not None:
        return services.authenticator.tenant_for(authorization)
    if services.settings.run_code_tenant is not None:
        return services.settings.run_code_tenant
    if services.settings.mode == "dev":
        return DEV_TENANT
    raise Unauthorized(
        "Missing API key: send 'Authorization: Bearer <key>', or set ORCH_RUN_CODE_TENANT to name the tenant "
        "that calls without one run as"
    )


FusionTenantDep = Annotated[str, Depends(get_fusion_tenant)]


def _pod(session: Session) -> str:
    # The container's short id, which is also its hostname.
    return session.sandbox.sandbox_id[:12]


def _answer(model: RunCodeResponse | RunJupyterResponse) -> TCIJSONResponse:
    return TCIJSONResponse(model.model_dump())


@router.get("/v1/ping", response_class=PlainTextResponse)
async def ping() -> PlainTextResponse:
    """Liveness, as SandboxFusion answers it."""
    return PlainTextResponse("pong")


@router.post("/run_code", responses={200: {"model": RunCodeResponse}, **_ERRORS})
async def run_code(body: RunCodeRequest, tenant: FusionTenantDep, services: ServicesDep) -> TCIJSONResponse:
    """Run ``code`` as a program (``python main.py`` with ``stdin`` piped) in a clean directory."""
    try:
        program = program_for(body)
    except InvalidRequest as exc:
        return _answer(sandbox_error(exc.message))
    settings = services.settings
    memory = body.memory_limit_MB * _MiB if body.memory_limit_MB > 0 else 0
    # tinker-cookbook sends int(timeout): 0 means "no time at all" there, as in SandboxFusion.
    timeout = min(max(body.run_timeout, 0.001), settings.execute_timeout_seconds)
    args = {
        "argv": program.argv,
        "stdin": body.stdin,
        "timeout": timeout,
        "files": program.files,
        "fetch_files": body.fetch_files,
        "memory_bytes": memory,
    }
    try:
        async with services.lanes.lease(tenant) as session:
            pod = _pod(session)
            try:
                run = RunResult.model_validate(await services.manager.call(session, "run", args, timeout))
            except ValidationError:
                await services.manager.end(session)
                return _answer(sandbox_error("the sandbox sent a malformed reply", pod=pod))
            except InvalidRequest as exc:
                # Refused before anything ran (an upload's name or size).
                return _answer(sandbox_error(f"invalid request: {exc.message}", pod=pod))
            except CapacityExhausted:
                raise  # nothing ran (the server is stopping): a 504, which verl sends again
            except OrchestratorError as exc:
                return _answer(sandbox_error(f"the sandbox failed: {exc.message}", pod=pod))
    except Saturated:
        raise
    except CapacityExhausted as exc:
        raise Saturated(exc.message, retry_after=exc.retry_after) from exc
    except OrchestratorError as exc:
        return _answer(sandbox_error(f"no sandbox could be started: {exc.message}"))
    return _answer(run_code_response(run, pod=pod))


@router.post("/run_jupyter", responses={200: {"model": RunJupyterResponse}, **_ERRORS})
async def run_jupyter(body: RunJupyterRequest, tenant: FusionTenantDep, services: ServicesDep) -> TCIJSONResponse:
    """Run ``cells`` in order in a new kernel; the session is removed afterwards."""
    try:
        session = await services.manager.open(tenant, listed=False)
    except CapacityExhausted as exc:
        raise Saturated(exc.message, retry_after=exc.retry_after) from exc
    except OrchestratorError as exc:
        return _answer(RunJupyterResponse(status="SandboxError", message=f"no sandbox could be started: {exc.message}"))
    try:
        return _answer(await _cells(body, session, services))
    finally:
        await services.manager.end(session)


async def _cells(body: RunJupyterRequest, session: Session, services: ServicesDep) -> RunJupyterResponse:
    manager = services.manager
    settings = services.settings
    # Like an execute's own timeout: any value is accepted, and capped at the server's maximum.
    longest = max(settings.max_execute_timeout_seconds, settings.execute_timeout_seconds)
    files: list[dict[str, str]] | None = uploads(dict(body.files)) or None
    began = time.monotonic()
    cells: list[CellRunResult] = []
    status: CommandRunStatus = "Finished"
    problem = ""
    reached = "total"  # which limit a cell that times out reaches
    try:
        for code in body.cells or ([""] if files else []):
            remaining = body.total_timeout - (time.monotonic() - began)
            if remaining <= 0:
                status, reached = "TimeLimitExceeded", "total"
                break
            limit = min(body.cell_timeout or remaining, remaining, longest)
            reached = "cell" if limit == body.cell_timeout else "total" if limit == remaining else "server"
            result = await manager.execute_in(session, code, files, limit)
            if result.outcome == "interrupted":
                # Only a stopping server interrupts these kernels: every request has a fresh one, so a
                # 504 (which verl sends again) loses nothing, where a cut-short "Success" would score wrong.
                raise Saturated("the server is restarting; send the request again", retry_after=1)
            files = None
            cells.append(to_cell(result))
            if result.outcome == "timeout":
                status = "TimeLimitExceeded"
                break
            if result.outcome in _BROKEN:
                status, problem = "Error", result.error_summary or result.outcome
                break
        fetched: dict[str, str] = {}
        left_out = 0
        if status == "Finished" and body.fetch_files:
            raw = await manager.call(session, "fetch", {"paths": body.fetch_files}, _FETCH_TIMEOUT)
            fetch = FetchResult.model_validate(raw)
            fetched, left_out = fetch.files, fetch.dropped_bytes
    except CapacityExhausted as exc:
        raise Saturated(exc.message, retry_after=exc.retry_after) from exc
    except (OrchestratorError, ValidationError) as exc:
        message = exc.message if isinstance(exc, OrchestratorError) else "the sandbox sent a malformed reply"
        return RunJupyterResponse(status="SandboxError", message=message, cells=cells, executor_pod_name=_pod(session))
    elapsed = time.monotonic() - began
    if status == "TimeLimitExceeded":
        problem = {
            "cell": f"a cell ran longer than its time limit ({body.cell_timeout:g} s per cell)",
            "total": f"the cells ran longer than their time limit ({body.total_timeout:g} s in total)",
            "server": f"a cell ran longer than this server lets one run ({longest:g} s)",
        }[reached]
    driver = CommandRunResult(
        status=status,
        execution_time=elapsed,
        return_code={"Finished": 0, "Error": 1}.get(status),
        stdout="",
        stderr=problem,
    )
    return RunJupyterResponse(
        status="Success" if status == "Finished" else "Failed",
        message=with_dropped_files(problem, left_out),
        driver=driver,
        cells=cells,
        executor_pod_name=_pod(session),
        files=fetched,
    )
