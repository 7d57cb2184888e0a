"""Shared by the client scripts, which run inside an SDK virtualenv (never imported by pytest).

Each script adapts one SDK generation to ``execute(code, session_id=None, files=None) -> dict``
(the response read back through the SDK's own typed objects) and runs the scenario named on
the command line. Configuration comes from the environment: ``TCI_BASE_URL`` and
``TOGETHER_API_KEY``. The result is printed as one JSON line prefixed with ``RESULT_PREFIX``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

RESULT_PREFIX = "TCI-COMPAT-RESULT: "
MISSING_SESSION = "ses_doesNotExist0123456789"
MYSCRIPT = "print('Hello from inside myscript.py!')\n"
# The docs' package example: install with pip inside the session, then use the package.
NUMPY_CODE = """!pip install numpy
import numpy as np
matrix = np.array([[1, 2], [3, 4]])
eigenvalues = np.linalg.eigvals(matrix)
print("Eigenvalues:", eigenvalues)
"""
PLOT_CODE = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"

Execute = Callable[..., dict[str, Any]]


def scenario_hello(execute: Execute) -> dict[str, Any]:
    return {"first": execute("print('Hello, world!')")}


def scenario_state(execute: Execute) -> dict[str, Any]:
    first = execute("x = 42")
    second = execute("print(x)", session_id=first["session_id"])
    return {"first": first, "second": second}


def scenario_numpy(execute: Execute) -> dict[str, Any]:
    return {"first": execute(NUMPY_CODE)}


def scenario_upload(execute: Execute) -> dict[str, Any]:
    files = [{"name": "myscript.py", "encoding": "string", "content": MYSCRIPT}]
    return {"first": execute("!python myscript.py", files=files)}


def scenario_plot(execute: Execute) -> dict[str, Any]:
    return {"first": execute(PLOT_CODE)}


def scenario_error(execute: Execute) -> dict[str, Any]:
    return {"first": execute("1/0")}


def scenario_notfound(execute: Execute, not_found_error: type[BaseException]) -> dict[str, Any]:
    try:
        response = execute("print('must not run')", session_id=MISSING_SESSION)
    except Exception as exc:  # noqa: BLE001 - which exception is the result
        return {
            "raised": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "is_sdk_not_found_error": isinstance(exc, not_found_error),
            "message": str(exc)[:2000],
        }
    return {"raised": None, "first": response}


SCENARIOS: dict[str, Callable[[Execute], dict[str, Any]]] = {
    "hello": scenario_hello,
    "state": scenario_state,
    "numpy": scenario_numpy,
    "upload": scenario_upload,
    "plot": scenario_plot,
    "error": scenario_error,
}
NAMES = [*SCENARIOS, "notfound"]


# The "queued_retry" scenario: how long the hasty client waits, and the execute it queues behind.
HASTY_TIMEOUT = 3.0
BLOCKER_SECONDS = 6.0


def _file_exists(session_id: str, name: str) -> bool:
    url = f"{os.environ['TCI_BASE_URL']}/tci/sessions/{session_id}/files/{name}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['TOGETHER_API_KEY']}"})
    try:
        with urllib.request.urlopen(request):
            return True
    except urllib.error.HTTPError:
        return False


def scenario_queued_retry(patient: Execute, hasty: Execute) -> dict[str, Any]:
    """An execute queued behind a longer one (of a patient client, on the same session) outlives its
    client's read timeout, so the SDK sends it again: the code must run once."""
    session_id = patient("ran = []")["session_id"]
    blocker = threading.Thread(
        target=patient,
        args=(f"import time\nopen('started', 'w').close()\ntime.sleep({BLOCKER_SECONDS})",),
        kwargs={"session_id": session_id},
    )
    blocker.start()
    deadline = time.monotonic() + 30
    # The file routes run beside an execute: the marker shows the blocker's code has started.
    while not _file_exists(session_id, "started"):
        if time.monotonic() > deadline:
            raise RuntimeError("the blocking execute never started")
        time.sleep(0.05)  # a pause between polls, not a synchronisation
    began = time.monotonic()
    queued = hasty("ran.append(1)", session_id=session_id)
    hasty_seconds = time.monotonic() - began
    blocker.join()
    return {"hasty": queued, "hasty_seconds": hasty_seconds, "final": patient("print(ran)", session_id=session_id)}


def scenario_running_retry(patient: Execute, hasty: Execute) -> dict[str, Any]:
    """Code that runs longer than its client waits: the SDK sends it again while it still runs, and
    the retry must be answered with the first attempt's result, not run it a second time."""
    session_id = patient("ran = []")["session_id"]
    began = time.monotonic()
    code = f"import time\nran.append(1)\ntime.sleep({HASTY_TIMEOUT + 2})\nprint(len(ran))"
    answer = hasty(code, session_id=session_id)
    hasty_seconds = time.monotonic() - began
    return {"hasty": answer, "hasty_seconds": hasty_seconds, "final": patient("print(ran)", session_id=session_id)}


def _session_ids() -> list[str]:
    url = f"{os.environ['TCI_BASE_URL']}/tci/sessions"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['TOGETHER_API_KEY']}"})
    with urllib.request.urlopen(request) as response:
        return [session["id"] for session in json.load(response)["data"]["sessions"]]


def scenario_running_retry_new(patient: Execute, hasty: Execute) -> dict[str, Any]:
    """The same without a session id: the retry must not start a second session and run it there."""
    began = time.monotonic()
    answer = hasty(f"import time\ntime.sleep({HASTY_TIMEOUT + 2})\nprint('done')")
    return {"hasty": answer, "hasty_seconds": time.monotonic() - began, "sessions": _session_ids()}


def run_scenario(name: str, execute: Execute, not_found_error: type[BaseException]) -> dict[str, Any]:
    """Run the scenario called ``name``; ``not_found_error`` is what this SDK raises for a 404."""
    if name == "notfound":
        return scenario_notfound(execute, not_found_error)
    return SCENARIOS[name](execute)


def emit(result: dict[str, Any]) -> None:
    """Print the result where the test finds it, whatever else the SDK printed."""
    sys.stdout.write("\n" + RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
