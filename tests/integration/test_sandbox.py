"""What issue-level users do to a sandbox, through the API, on the real engine and image."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app

from .conftest import execute, text_of

pytestmark = pytest.mark.docker

PACKAGES = [
    "aiohttp",
    "bs4",
    "bokeh",
    "gensim",
    "imageio",
    "joblib",
    "librosa",
    "matplotlib",
    "nltk",
    "numpy",
    "cv2",
    "openpyxl",
    "pandas",
    "plotly",
    "pytest",
    "docx",
    "pytz",
    "requests",
    "skimage",
    "sklearn",
    "scipy",
    "seaborn",
    "soundfile",
    "spacy",
    "textblob",
    "tornado",
    "urllib3",
    "xarray",
    "xlrd",
    "sympy",
]


def test_every_preinstalled_package_imports(api):
    code = "\n".join(f"import {name}" for name in PACKAGES) + f"\nprint('imported', {len(PACKAGES)})"
    data = execute(api, code)
    assert text_of(data, "stdout").strip() == f"imported {len(PACKAGES)}", data["outputs"]


def test_plot_comes_back_as_png(api):
    data = execute(api, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    [display] = [o for o in data["outputs"] if o["type"] == "display_data"]
    assert base64.b64decode(display["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert display["data"]["text/plain"].startswith("<Figure size")


def test_pip_install_of_a_preinstalled_package_works_offline(api):
    data = execute(api, "!pip install numpy\nimport numpy as np\nprint(np.linalg.eigvals(np.eye(2)))")
    assert "already satisfied" in text_of(data, "stdout").lower()
    assert "[1. 1.]" in text_of(data, "stdout")


def test_memory_bomb_is_reported_and_the_session_recovers(make_settings):
    settings = make_settings(execute_timeout_seconds=30, sandbox={"memory_bytes": 512 * 1024 * 1024})
    with TestClient(create_app(settings)) as api:
        first = execute(api, "keep = 1\nprint('before')")
        sid = first["session_id"]
        bomb = execute(api, "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))", sid)
        assert bomb["outcome"] == "oom", bomb
        assert "out of memory" in text_of(bomb, "error")
        assert bomb["state_lost"] is True
        after = execute(api, "print('alive')", sid)
        assert text_of(after, "stdout") == "alive\n"


def test_fork_bomb_is_contained(api):
    # Children exec into `sleep` at once, so this exhausts pids rather than memory.
    data = execute(
        api,
        "import os\nstarted = 0\nfailed = None\n"
        "for _ in range(2000):\n"
        "    try:\n        pid = os.fork()\n    except OSError as e:\n        failed = e.errno\n        break\n"
        "    if pid == 0:\n        os.execv('/bin/sleep', ['sleep', '300'])\n"
        "    started += 1\n"
        "print(started, failed)",
    )
    started, failed = text_of(data, "stdout").split()
    assert 100 < int(started) < 256, data
    assert failed == "11", data  # EAGAIN at the pids limit
    after = execute(api, "import os\nprint(sum(1 for p in os.listdir('/proc') if p.isdigit()))", data["session_id"])
    assert int(text_of(after, "stdout")) < 10, "the leftover sleeps were swept after the execute"


def test_infinite_loop_times_out_and_the_session_survives(make_settings):
    with TestClient(create_app(make_settings(execute_timeout_seconds=2))) as api:
        sid = execute(api, "x = 42")["session_id"]
        data = execute(api, "print('start')\nwhile True:\n    pass", sid)
        assert data["outcome"] == "timeout"
        assert text_of(data, "stdout") == "start\n"
        assert "2 s" in text_of(data, "error")
        assert text_of(execute(api, "print(x)", sid), "stdout") == "42\n"


def test_imports_go_through_held_directories_in_the_interpreter_and_its_children(api):
    """Every Python process of the sandbox imports from the image's trees relative to held directories."""
    probe = (
        "from importlib import _bootstrap_external as external\n"
        "from sandbox_runner import lookups\n"
        "print(external._path_stat.__module__, sorted(root.prefix for root in lookups._roots))"
    )
    expected = "sandbox_runner.lookups ['/opt/venv/', '/usr/lib/python3.11/']"
    data = execute(
        api,
        f"{probe}\nimport subprocess, sys\n"
        f"print(subprocess.run([sys.executable, '-c', {probe!r}], capture_output=True, text=True).stdout, end='')\n"
        "import pandas, json\nprint(pandas.__file__)",
    )
    assert text_of(data, "stdout").splitlines() == [
        expected,
        expected,
        "/opt/venv/lib/python3.11/site-packages/pandas/__init__.py",
    ], data
