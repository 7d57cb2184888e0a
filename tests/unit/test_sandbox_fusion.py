"""SandboxFusion's mapping: status derivation, programs per language, uploads (pure functions)."""

from __future__ import annotations

import pytest

from orchestrator.errors import InvalidRequest
from orchestrator.runner_client import RunResult
from orchestrator.sandbox_fusion import (
    CommandRunResult,
    RunCodeRequest,
    parse_run_status,
    program_for,
    run_code_response,
    uploads,
    with_dropped_files,
)


def _run(status: str = "Finished", code: int | None = 0, stderr: str = "") -> CommandRunResult:
    return CommandRunResult(status=status, return_code=code, stderr=stderr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("compile_result", "run_result", "expected"),
    [
        (None, _run(), ("Success", "")),
        (None, _run(code=1), ("Failed", "")),
        (None, _run("TimeLimitExceeded", None), ("Failed", "")),
        (None, _run("Error", None, "boom"), ("SandboxError", "boom")),
        (_run(code=1), None, ("Failed", "")),
        (_run("Error", None, "cc broke"), _run(code=1), ("SandboxError", "cc broke")),
    ],
)
def test_status_derivation_matches_sandbox_fusion(
    compile_result: CommandRunResult | None, run_result: CommandRunResult | None, expected: tuple[str, str]
) -> None:
    assert parse_run_status(compile_result, run_result) == expected


def test_programs_per_language() -> None:
    python = program_for(RunCodeRequest(code="print(1)", language="python", files={"a.txt": "aGk=", "b": None}))
    assert python.argv == ["python", "main.py"]
    assert python.files == [
        {"name": "a.txt", "content": "aGk=", "encoding": "base64"},
        {"name": "main.py", "content": "print(1)", "encoding": "string"},
    ]
    pytest_run = program_for(RunCodeRequest(code="", language="pytest", args=["-x"]))
    assert pytest_run.argv == ["pytest", "test_main.py", "-x"]
    assert program_for(RunCodeRequest(code="", language="bash", args=["-x"])).argv == ["/bin/bash", "main.sh"]
    with pytest.raises(InvalidRequest, match="'java' is not available"):
        program_for(RunCodeRequest(code="", language="java"))
    with pytest.raises(InvalidRequest, match=r"main\.py"):
        program_for(RunCodeRequest(code="", language="python", files={"main.py": ""}))


def test_uploads_skip_empty_and_ignored_entries() -> None:
    assert uploads({"x": None, "IGNORE_THIS_FILE.txt": "aA==", "y": "aA=="}) == [
        {"name": "y", "content": "aA==", "encoding": "base64"}
    ]


def test_an_oom_says_so_in_message_and_flag() -> None:
    run = RunResult(
        stdout="",
        stderr="",
        return_code=-9,
        execution_time=0.5,
        timed_out=False,
        oom=True,
        memory_limit_bytes=100 * 2**20,
    )
    answer = run_code_response(run, pod="abc")
    assert (answer.status, answer.oom, answer.run_result and answer.run_result.return_code) == ("Failed", True, -9)
    assert answer.message == "MemoryLimitExceeded: the program ran out of memory (limit 100 MiB) and was killed"
    timed = run_code_response(
        RunResult(stdout="", stderr="", return_code=None, execution_time=1, timed_out=True, oom=False),
        pod=None,
    )
    assert (timed.status, timed.message, timed.run_result and timed.run_result.status) == (
        "Failed",
        "",
        "TimeLimitExceeded",
    )


def test_files_left_out_of_fetch_files_are_said() -> None:
    run = RunResult(
        stdout="",
        stderr="",
        return_code=0,
        execution_time=0.1,
        timed_out=False,
        oom=False,
        dropped_bytes={"files": 62914560},
        files={"small.txt": "eA=="},
    )
    answer = run_code_response(run, pod=None)
    assert (answer.status, answer.files) == ("Success", {"small.txt": "eA=="})
    assert answer.message == "fetch_files: 62914560 bytes of files were left out, past the total the sandbox returns"
    assert with_dropped_files("the cells failed", 5) == (
        "the cells failed; fetch_files: 5 bytes of files were left out, past the total the sandbox returns"
    )
    assert with_dropped_files("", 0) == ""
