"""SandboxFusion's wire schema and its mapping onto runner requests and results (pure, no I/O).

Field names, defaults and the status derivation follow SandboxFusion's ``sandbox/server/sandbox_api.py``
and ``sandbox/runners/types.py``, so its clients (verl, tinker-cookbook) need no change. Two fields
are ours: ``oom`` on ``/run_code`` answers (SandboxFusion has no way to say it), and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import InvalidRequest
from .models import ExecuteResult
from .runner_client import RunResult

Language = Literal[
    "python", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash", "typescript", "sql",
    "rust", "cuda", "lua", "R", "perl", "D_ut", "ruby", "scala", "julia", "pytest", "junit",
    "kotlin_script", "jest", "verilog", "python_gpu", "lean", "swift", "racket",
]  # fmt: skip
RunStatus = Literal["Success", "Failed", "SandboxError"]
CommandRunStatus = Literal["Finished", "Error", "TimeLimitExceeded"]

# What each supported language runs: the source file's name and the command around it.
_PROGRAMS: dict[str, tuple[str, list[str]]] = {
    "python": ("main.py", ["python", "main.py"]),
    "pytest": ("test_main.py", ["pytest", "test_main.py"]),
    "bash": ("main.sh", ["/bin/bash", "main.sh"]),
    "perl": ("main.pl", ["perl", "main.pl"]),
}
SUPPORTED_LANGUAGES = tuple(_PROGRAMS)
# SandboxFusion skips uploads whose name holds this marker.
_IGNORED_FILE = "IGNORE_THIS_FILE"


class RunCodeRequest(BaseModel):
    """``POST /run_code``."""

    compile_timeout: float = Field(10, description="compile timeout for compiled languages")
    run_timeout: float = Field(10, ge=0, description="code run timeout in seconds")
    memory_limit_MB: int = Field(-1, description="maximum memory allowed in megabytes (-1: the sandbox's)")
    code: str = Field(examples=['print("hello")'])
    stdin: str | None = Field(None, examples=[""])
    language: Language = Field(examples=["python"])
    files: dict[str, str | None] = Field(default_factory=dict, description="path -> base64 content")
    fetch_files: list[str] = Field(default_factory=list, description="paths to return after the run")
    args: list[str] = Field(default_factory=list, description="extra command-line arguments for pytest")


class CommandRunResult(BaseModel):
    """One command's outcome."""

    status: CommandRunStatus
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeResponse(BaseModel):
    """The ``/run_code`` answer (always HTTP 200)."""

    status: RunStatus
    message: str
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    oom: bool = Field(False, description="extension: the run was killed for using more memory than its limit")


class RunJupyterRequest(BaseModel):
    """``POST /run_jupyter``: cells run in order in a new kernel."""

    cells: list[str]
    cell_timeout: float = Field(0, ge=0, description="limit per cell in seconds (0: only the total)")
    total_timeout: float = Field(45, gt=0, description="limit for all cells in seconds")
    memory_limit_MB: int = Field(-1, description="accepted for compatibility; the sandbox's limit applies")
    kernel: Literal["python3"] = "python3"
    files: dict[str, str] = Field(default_factory=dict, description="path -> base64 content")
    fetch_files: list[str] = Field(default_factory=list)


class CellRunResult(BaseModel):
    """One cell's output."""

    stdout: str
    stderr: str
    display: list[dict[str, Any]]
    error: list[dict[str, Any]]


class RunJupyterResponse(BaseModel):
    """The ``/run_jupyter`` answer (always HTTP 200)."""

    status: RunStatus
    message: str
    driver: CommandRunResult | None = None
    cells: list[CellRunResult] = Field(default_factory=list)
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True)
class Program:
    """What the runner's ``run`` op is asked to do for one request."""

    argv: list[str]
    files: list[dict[str, str]]


def uploads(files: dict[str, str | None]) -> list[dict[str, str]]:
    """SandboxFusion's ``files`` as runner uploads (entries without content are skipped, as there)."""
    return [
        {"name": name, "content": content, "encoding": "base64"}
        for name, content in files.items()
        if isinstance(content, str) and _IGNORED_FILE not in name
    ]


def program_for(request: RunCodeRequest) -> Program:
    """The command and files for ``request``.

    Raises:
        InvalidRequest: the language is one of SandboxFusion's that this sandbox image cannot run,
            or an upload has the source file's name.
    """
    if request.language not in _PROGRAMS:
        raise InvalidRequest(
            f"language {request.language!r} is not available in this sandbox; supported: "
            + ", ".join(SUPPORTED_LANGUAGES),
            param="language",
        )
    source, argv = _PROGRAMS[request.language]
    if source in request.files:
        raise InvalidRequest(f"files must not contain {source!r}: the code is written there", param="files")
    files = [*uploads(request.files), {"name": source, "content": request.code, "encoding": "string"}]
    extra = request.args if request.language == "pytest" else []
    return Program(argv=[*argv, *extra], files=files)


def parse_run_status(
    compile_result: CommandRunResult | None, run_result: CommandRunResult | None
) -> tuple[RunStatus, str]:
    """SandboxFusion's derivation: an ``Error`` is ours; a time-out or a non-zero exit is the code's."""
    results = [r for r in (compile_result, run_result) if r is not None]
    for result in results:
        if result.status == "Error":
            return "SandboxError", result.stderr or ""
    if any(r.status == "TimeLimitExceeded" for r in results):
        return "Failed", ""
    if any(r.return_code not in {None, 0} for r in results):
        return "Failed", ""
    return "Success", ""


def run_code_response(run: RunResult, *, pod: str | None) -> RunCodeResponse:
    """The answer for a finished ``run`` op."""
    result = CommandRunResult(
        status="TimeLimitExceeded" if run.timed_out else "Finished",
        execution_time=run.execution_time,
        return_code=run.return_code,
        stdout=run.stdout,
        stderr=run.stderr,
    )
    status, message = parse_run_status(None, result)
    if run.oom:
        limit = f" (limit {run.memory_limit_bytes // 2**20} MiB)" if run.memory_limit_bytes else ""
        message = f"MemoryLimitExceeded: the program ran out of memory{limit} and was killed"
    message = with_dropped_files(message, run.dropped_bytes.get("files", 0))
    return RunCodeResponse(
        status=status, message=message, run_result=result, executor_pod_name=pod, files=run.files, oom=run.oom
    )


def with_dropped_files(message: str, dropped: int) -> str:
    """``message``, saying so if ``fetch_files`` left files out (past the sandbox's total for them)."""
    if not dropped:
        return message
    note = f"fetch_files: {dropped} bytes of files were left out, past the total the sandbox returns"
    return f"{message}; {note}" if message else note


def sandbox_error(message: str, *, pod: str | None = None) -> RunCodeResponse:
    """A ``/run_code`` answer for a failure on our side."""
    return RunCodeResponse(status="SandboxError", message=message, executor_pod_name=pod)


def cell_result(result: ExecuteResult) -> CellRunResult:
    """One cell's outputs in SandboxFusion's shape."""
    stdout = "".join(o["data"] for o in result.outputs if o["type"] == "stdout")
    stderr = "".join(o["data"] for o in result.outputs if o["type"] == "stderr")
    display = [o["data"] for o in result.outputs if o["type"] in {"display_data", "execute_result"}]
    errors: list[dict[str, Any]] = []
    for output in result.outputs:
        if output["type"] != "error":
            continue
        ename, _, evalue = (result.error_summary or "Error").partition(": ")
        errors.append({"ename": ename, "evalue": evalue, "traceback": str(output["data"]).splitlines()})
    return CellRunResult(stdout=stdout, stderr=stderr, display=display, error=errors)
