"""Drive the server with the 2.x SDK: ``python v2_client.py SCENARIO [--strict]``.

``client.code_interpreter.execute(...)`` and ``client.code_interpreter.sessions.list()``; with
``--strict`` the client validates every response (``_strict_response_validation=True``). Every
HTTP request is recorded through an httpx event hook, so retries would show up as extra requests.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

import httpx
import together
from _common import HASTY_TIMEOUT, NAMES, emit, run_scenario, scenario_queued_retry
from together import Together

REQUESTS: list[dict[str, Any]] = []


def _record(response: httpx.Response) -> None:
    REQUESTS.append(
        {
            "method": response.request.method,
            "path": response.request.url.raw_path.decode(),
            "status": response.status_code,
            "retry_count": response.request.headers.get("x-stainless-retry-count"),
        }
    )


# The read timeout of the "read_timeout" scenario: the SDK sends it as x-stainless-read-timeout.
READ_TIMEOUT = 12.0


def make_client(strict: bool, timeout: float | None = None) -> Together:
    http_client = together.DefaultHttpxClient(event_hooks={"response": [_record]})
    return Together(
        base_url=os.environ["TCI_BASE_URL"],
        api_key=os.environ["TOGETHER_API_KEY"],
        http_client=http_client,
        _strict_response_validation=strict,
        **({"timeout": timeout} if timeout is not None else {}),
    )


def _output(output: Any) -> dict[str, Any]:
    if output.type in {"display_data", "execute_result"}:
        bundle = output.data
        data: Any = {
            key: value
            for key, value in {
                "image/png": bundle.image_png,
                "text/plain": bundle.text_plain,
                "text/html": bundle.text_html,
            }.items()
            if value is not None
        }
    else:
        data = output.data
    return {"type": output.type, "data": data, "model": type(output).__name__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=[*NAMES, "sessions", "read_timeout", "queued_retry"])
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    client = make_client(args.strict, READ_TIMEOUT if args.scenario == "read_timeout" else None)

    def execute(
        code: str, session_id: str | None = None, files: list[dict[str, str]] | None = None, *, via: Together = client
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"code": code, "language": "python"}
        if session_id is not None:
            kwargs["session_id"] = session_id
        if files is not None:
            kwargs["files"] = files
        response = via.code_interpreter.execute(**kwargs)
        return {
            "class": type(response).__name__,
            "session_id": response.data.session_id,
            "status": response.data.status,
            "outputs": [_output(output) for output in response.data.outputs],
            "top_errors": response.errors,
        }

    def list_sessions() -> list[dict[str, Any]]:
        response = client.code_interpreter.sessions.list()
        assert response.data is not None
        return [
            {
                "id": session.id,
                "execute_count": session.execute_count,
                "started_at": session.started_at.isoformat(),
                "last_execute_at": session.last_execute_at.isoformat(),
                "expires_at": session.expires_at.isoformat(),
                "types": sorted(
                    {type(v).__name__ for v in (session.started_at, session.last_execute_at, session.expires_at)}
                ),
                "tz_aware": all(
                    v.tzinfo is not None for v in (session.started_at, session.last_execute_at, session.expires_at)
                ),
            }
            for session in response.data.sessions
        ]

    if args.scenario == "sessions":
        first = execute("x = 1")
        listed_once = list_sessions()
        second = execute("x += 1\nprint(x)", session_id=first["session_id"])
        listed_twice = list_sessions()
        result: dict[str, Any] = {
            "first": first,
            "second": second,
            "listed_once": listed_once,
            "listed_twice": listed_twice,
        }
    elif args.scenario == "read_timeout":
        # Longer than the client waits: the server must stop it first and answer once, or the SDK
        # times out and sends the code again.
        result = {"first": execute("import time\nprint('started', flush=True)\ntime.sleep(30)\nprint('late')")}
    elif args.scenario == "queued_retry":
        hasty = make_client(args.strict, HASTY_TIMEOUT)
        result = scenario_queued_retry(execute, functools.partial(execute, via=hasty))
    else:
        result = run_scenario(args.scenario, execute, together.NotFoundError)
    result["requests"] = REQUESTS
    result["sdk"] = together.__version__
    emit(result)


if __name__ == "__main__":
    main()
