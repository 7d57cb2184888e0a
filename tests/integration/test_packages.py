"""`!pip install` through the index gate and the shared package cache, with real pip in real sandboxes.

One package cache serves the module: it reaches the real upstream index through a proxy the tests
can cut, so "upstream unreachable" is a real outage. Sessions come from one shared server; the
settings that differ (a tiny download cap, installs off) get servers of their own.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import pytest
from fastapi.testclient import TestClient
from support.package_cache import package_cache
from support.upstream import CuttableProxy

from orchestrator.app import create_app
from orchestrator.backends import labels
from orchestrator.settings import PackageSettings, SandboxSettings, Settings

from .conftest import IMAGE, RUN_PREFIX, execute, remove_labelled, socket_dir, text_of

pytestmark = pytest.mark.docker

# Small, not preinstalled: one pure-Python wheel and one with a compiled extension.
PURE, COMPILED = "tabulate", "ujson"


@pytest.fixture(scope="module")
def upstream() -> Iterator[CuttableProxy]:
    with CuttableProxy() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def cache_url(upstream: CuttableProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # A 1 s TTL makes every install after the first ask the upstream again: an outage is noticed.
    with package_cache(tmp_path_factory.mktemp("package-cache"), https_proxy=upstream.url, index_ttl=1) as url:
        yield url


@pytest.fixture(scope="module")
def server_factory(docker_client: docker.DockerClient, cache_url: str) -> Iterator[Callable[..., TestClient]]:
    """Servers on the real engine, all pointing at the module's cache; removed with their containers."""
    run_ids: list[str] = []
    clients: list[TestClient] = []

    def make(**packages: Any) -> TestClient:
        run_id = RUN_PREFIX + secrets.token_hex(6)
        run_ids.append(run_id)
        settings = Settings(
            backend="docker",
            instance=run_id,
            test_run_label=run_id,
            sandbox=SandboxSettings(image=IMAGE),
            packages=PackageSettings(cache_url=cache_url, **packages),
            pool_size=0,
            reaper_interval_seconds=3600,
            execute_timeout_seconds=120,
            log_format="console",
        )
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    for run_id in run_ids:
        remove_labelled(docker_client, f"{labels.TEST_RUN}={run_id}")
        shutil.rmtree(socket_dir(run_id), ignore_errors=True)


@pytest.fixture(scope="module")
def api(server_factory: Callable[..., TestClient]) -> TestClient:
    return server_factory()


def install(api: TestClient, *packages: str, session_id: str | None = None) -> dict[str, Any]:
    imports = ", ".join(p.replace("-", "_") for p in packages)
    return execute(api, f"!pip install {' '.join(packages)}\nimport {imports}\nprint('imported')", session_id)


def test_install_pure_and_compiled_packages(api: TestClient) -> None:
    data = install(api, PURE, COMPILED)
    stdout = text_of(data, "stdout")
    assert data["outcome"] == "ok", data["outputs"]
    [installed] = [line for line in stdout.splitlines() if line.startswith("Successfully installed")]
    assert PURE in installed, stdout
    assert COMPILED in installed, stdout
    assert stdout.rstrip().endswith("imported"), stdout
    # pip's progress bar is off: agents read this text.
    assert "\x1b[" not in stdout


TRIM_CHECK = """
import json, urllib.request
from pip._internal.network.session import user_agent
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename

def files(agent):
    headers = {"Accept": "application/vnd.pypi.simple.v1+json", "User-Agent": agent}
    request = urllib.request.Request("http://127.0.0.1:3141/simple/ujson/", headers=headers)
    return [entry["filename"] for entry in json.load(urllib.request.urlopen(request))["files"]]

whole, trimmed = files("curl/8"), files(user_agent())
tags = set(sys_tags())
fits = [n for n in whole if n.endswith(".whl") and not parse_wheel_filename(n)[3].isdisjoint(tags)]
print(json.dumps({
    "whole": len(whole), "trimmed": len(trimmed), "subset": set(trimmed) <= set(whole),
    "missing": [n for n in fits if n not in trimmed],
    "sdists": [n for n in whole if n.endswith(".tar.gz") and n not in trimmed],
    "misfits": [n for n in trimmed if n.endswith(".whl") and n not in fits],
}))
"""


def test_index_pages_reach_pip_trimmed_to_what_this_sandbox_can_install(api: TestClient) -> None:
    # Checked against pip's own tags inside the sandbox: nothing it could install is missing.
    found = json.loads(text_of(execute(api, TRIM_CHECK), "stdout"))
    assert found["subset"], found
    assert found["missing"] == found["sdists"] == found["misfits"] == [], found
    assert found["trimmed"] < found["whole"] / 4, found


def test_an_installed_package_can_be_changed_to_another_version_and_uninstalled(api: TestClient) -> None:
    # pip removes only what lies under the venv's prefix: packages go to /opt/venv/local, not ~/.local.
    code = (
        "!pip install -q termcolor==2.4.0\n!pip install -q termcolor==2.3.0\n"
        "import importlib.metadata, os, site\n"
        "print(sorted(n for n in os.listdir(site.getusersitepackages()) if n.startswith('termcolor-')))\n"
        "print(importlib.metadata.version('termcolor'))\n"
        "!pip uninstall -y -q termcolor\n"
        "print(sorted(n for n in os.listdir(site.getusersitepackages()) if n.startswith('termcolor')))"
    )
    data = execute(api, code)
    assert text_of(data, "stdout").splitlines()[-3:] == ["['termcolor-2.3.0.dist-info']", "2.3.0", "[]"], data


def test_two_sessions_installing_at_once_both_succeed(api: TestClient) -> None:
    # The two other ways in: IPython's %pip, and pip as a subprocess of the user's code.
    magic = "%pip install termcolor tabulate\nimport termcolor, tabulate\nprint('imported')"
    subprocess_call = (
        "import subprocess, sys\n"
        "subprocess.run(['pip', 'install', 'toolz', 'tabulate'], check=True)\n"
        "import toolz, tabulate\nprint('imported')"
    )
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda code: execute(api, code), [magic, subprocess_call]))
    for data in results:
        assert data["outcome"] == "ok", data["outputs"]
        assert text_of(data, "stdout").rstrip().endswith("imported"), data["outputs"]
    assert results[0]["session_id"] != results[1]["session_id"]


def test_an_sdist_builds_with_what_the_image_has(api: TestClient) -> None:
    # Its build backend and their dependencies come through the same gate.
    data = execute(api, "!pip install --no-binary termcolor termcolor\nimport termcolor\nprint('imported')")
    stdout = text_of(data, "stdout")
    assert "Building wheel for termcolor" in stdout, data["outputs"]
    assert stdout.rstrip().endswith("imported"), data["outputs"]


def test_cached_installs_work_while_the_upstream_is_down(api: TestClient, upstream: CuttableProxy) -> None:
    first = install(api, PURE, COMPILED)  # cached by now, whichever test ran first
    assert first["outcome"] == "ok", first["outputs"]
    with upstream.outage():
        # Proof that the outage is real: nothing new can be fetched.
        fresh = execute(api, "!pip install humanize")
        assert "Successfully installed" not in text_of(fresh, "stdout"), fresh["outputs"]
        again = install(api, PURE, COMPILED)  # a new session: nothing of the first one is reused
    assert again["session_id"] != first["session_id"]
    assert again["outcome"] == "ok", again["outputs"]
    assert text_of(again, "stdout").rstrip().endswith("imported"), again["outputs"]


def _gateway() -> str:
    out = subprocess.run(
        ["docker", "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}}{{end}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "172.17.0.1"


PROBE = """
import errno, json, socket, urllib.request
results = {}
for host, port in TARGETS:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        results[f"{host}:{port}"] = "connected"
    except OSError as exc:
        results[f"{host}:{port}"] = errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()
for url in URLS:
    try:
        urllib.request.urlopen(url, timeout=3)
        results[url] = "fetched"
    except Exception as exc:
        results[url] = type(exc).__name__ + ": " + str(getattr(exc, "code", "") or getattr(exc, "reason", exc))
print(json.dumps(results))
"""


def test_everything_but_the_index_is_sealed(api: TestClient, cache_url: str) -> None:
    gateway = _gateway()
    cache_port = int(cache_url.rsplit(":", 1)[1])
    # 192.0.2.1 is TEST-NET-1 (never routed): it stands in for "any internet address".
    targets = [
        ("192.0.2.1", 443),
        ("192.0.2.1", 80),
        ("169.254.169.254", 80),
        (gateway, 2375),
        (gateway, 22),
        (gateway, cache_port),
        (gateway, 8000),
    ]
    urls = [
        "http://192.0.2.1/",
        "https://pypi.org/simple/",
        "http://169.254.169.254/latest/meta-data/",
        # The relay reaches the gate, and the gate lets only the index's read paths through.
        "http://127.0.0.1:3141/",
        "http://127.0.0.1:3141/index/tabulate/",
        "http://127.0.0.1:3141/simple/../cache/list",
        "http://127.0.0.1:3141/health",
    ]
    code = f"TARGETS = {targets!r}\nURLS = {urls!r}\n" + PROBE
    data = execute(api, code)
    results = json.loads(text_of(data, "stdout"))
    for host, port in targets:
        # No route at all: the connection is refused by the sandbox's own kernel, nothing leaves.
        assert results[f"{host}:{port}"] == "ENETUNREACH", results
    assert results["http://192.0.2.1/"].startswith("URLError"), results
    assert results["https://pypi.org/simple/"].startswith("URLError"), results  # no DNS either
    assert results["http://169.254.169.254/latest/meta-data/"].startswith("URLError"), results
    for url in urls[3:]:
        assert results[url] == "HTTPError: 403", (url, results)


def test_the_gate_refuses_writes_and_other_paths_on_its_socket(api: TestClient) -> None:
    code = textwrap.dedent(
        """
        import socket
        answers = []
        for request in (b"DELETE /simple/tabulate/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
                        b"GET /cache/list HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n",
                        b"POST /simple/tabulate/ HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n\\r\\n"):
            s = socket.socket(socket.AF_UNIX)
            s.connect("/run/tci-runner/index.sock")
            s.sendall(request)
            answers.append(s.recv(200).split(b"\\r\\n")[0].decode())
            s.close()
        print(answers)
        """
    )
    data = execute(api, code)
    out = text_of(data, "stdout")
    assert out.count("403 only the package index is reachable from a sandbox") == 3, data["outputs"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            "!pip install https://files.pythonhosted.org/packages/tabulate-0.9.0-py3-none-any.whl",
            "Failed to connect to files.pythonhosted.org",
        ),
        ("!pip install git+https://github.com/astanin/python-tabulate", "Cannot find command 'git'"),
        ("!pip install --index-url http://example.invalid/simple/ termcolor", "No matching distribution"),
        (
            "!pip install --extra-index-url http://example.invalid/simple/ not-on-pypi-tci-probe",
            "No matching distribution",
        ),
    ],
    ids=["url", "vcs", "other-index", "extra-index"],
)
def test_installs_from_anywhere_but_the_index_fail(api: TestClient, command: str, expected: str) -> None:
    data = execute(api, command + "\nimport importlib.util\nprint('found', importlib.util.find_spec('termcolor'))")
    out = text_of(data, "stdout") + text_of(data, "stderr")
    assert expected in out, data["outputs"]
    assert "Successfully installed" not in out, data["outputs"]


def test_the_download_cap_holds(server_factory: Callable[..., TestClient]) -> None:
    capped = server_factory(max_download_bytes=1024 * 1024)
    # Faker's wheel (pure Python, mostly locale data) is about 2 MiB.
    data = execute(capped, "!pip install --no-deps faker")
    out = text_of(data, "stdout") + text_of(data, "stderr")
    assert "download limit" in out or "exceed the session's limit of 1 MiB" in out, data["outputs"]
    assert "Successfully installed" not in out, data["outputs"]


def test_installs_can_be_turned_off(server_factory: Callable[..., TestClient]) -> None:
    off = server_factory(enabled=False)
    data = execute(off, "!pip install tabulate")
    out = text_of(data, "stdout") + text_of(data, "stderr")
    assert "package-installs-are-disabled-on-this-server" in out, data["outputs"]
    assert "No matching distribution found for tabulate" in out, data["outputs"]
    assert "Retrying" not in out, data["outputs"]  # fails at once: no DNS or connection retries
    # Preinstalled packages are still "installed".
    again = execute(off, "!pip install numpy", data["session_id"])
    assert "Requirement already satisfied: numpy" in text_of(again, "stdout"), again["outputs"]
