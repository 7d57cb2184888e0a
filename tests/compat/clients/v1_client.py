"""Drive the server with the 1.x SDK: ``python v1_client.py SCENARIO``.

``client.code_interpreter.run(...)``. Every HTTP request the SDK sends through ``requests`` is
recorded, so retries would show up as extra requests.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
from typing import Any
from urllib.parse import urlsplit

import requests
from _common import (
    HASTY_TIMEOUT,
    NAMES,
    emit,
    run_scenario,
    scenario_queued_retry,
    scenario_running_retry,
    scenario_running_retry_new,
)
from together import Together
from together.error import InvalidRequestError

REQUESTS: list[dict[str, Any]] = []
_original_request = requests.Session.request


def _recording_request(self: requests.Session, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
    response = _original_request(self, method, url, *args, **kwargs)
    REQUESTS.append({"method": method.upper(), "path": urlsplit(url).path, "status": response.status_code})
    return response


requests.Session.request = _recording_request  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    hasty_scenarios = {
        "queued_retry": scenario_queued_retry,
        "running_retry": scenario_running_retry,
        "running_retry_new": scenario_running_retry_new,
    }
    parser.add_argument("scenario", choices=[*NAMES, *hasty_scenarios])
    args = parser.parse_args()
    client = Together(api_key=os.environ["TOGETHER_API_KEY"], base_url=os.environ["TCI_BASE_URL"])

    def execute(
        code: str, session_id: str | None = None, files: list[dict[str, str]] | None = None, *, via: Together = client
    ) -> dict[str, Any]:
        response = via.code_interpreter.run(code=code, language="python", session_id=session_id, files=files)
        return {
            "class": type(response).__name__,
            "session_id": response.data.session_id,
            "status": response.data.status,
            "outputs": [{"type": o.type, "data": o.data, "model": type(o).__name__} for o in response.data.outputs],
            "data_errors": response.data.errors,
        }

    if args.scenario in hasty_scenarios:
        # 1.x sends no read timeout: the abandoned attempt is recognised by its closed connection.
        hasty = Together(
            api_key=os.environ["TOGETHER_API_KEY"], base_url=os.environ["TCI_BASE_URL"], timeout=HASTY_TIMEOUT
        )
        result = hasty_scenarios[args.scenario](execute, functools.partial(execute, via=hasty))
    else:
        result = run_scenario(args.scenario, execute, InvalidRequestError)
    result["requests"] = REQUESTS
    result["sdk"] = importlib.metadata.version("together")
    emit(result)


if __name__ == "__main__":
    main()
