"""Index pages trimmed to what the asking pip could install: never a file pip would have taken."""

from __future__ import annotations

import json
import platform
import sys

import pytest
from packaging.tags import sys_tags

from orchestrator.index_pages import Interpreter, interpreter_of, supported_tags, trim

# What pip 26.3 sends from the sandbox image.
SANDBOX_PIP = (
    'pip/26.3 {"ci":null,"cpu":"x86_64","distro":{"id":"bookworm","libc":{"lib":"glibc","version":"2.36"},'
    '"name":"Debian GNU/Linux","version":"12"},"implementation":{"name":"CPython","version":"3.11.2"},'
    '"installer":{"name":"pip","version":"26.3"},"python":"3.11.2","system":{"name":"Linux","release":"6.1"}}'
)
SANDBOX = Interpreter((3, 11), (2, 36), "x86_64")

KEPT = [
    "ujson-5.10.0.tar.gz",
    "ujson-1.15.zip",
    "ujson-5.10.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "ujson-5.10.0-cp311-cp311-manylinux_2_36_x86_64.whl",
    "ujson-5.1.0-cp311-cp311-manylinux1_x86_64.whl",
    "ujson-5.10.0-cp38-abi3-manylinux_2_28_x86_64.whl",
    "ujson-5.10.0-py3-none-any.whl",
    "ujson-5.10.0-py2.py3-none-any.whl",
    "ujson-5.10.0-cp311-none-linux_x86_64.whl",
    "not a wheel name-.whl",  # pip's own reading decides
]
DROPPED = [
    "ujson-5.10.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "ujson-5.10.0-cp310-cp310-manylinux_2_17_x86_64.whl",
    "ujson-5.10.0-cp311-cp311-manylinux_2_39_x86_64.whl",  # newer glibc than the sandbox's
    "ujson-5.10.0-cp311-cp311-musllinux_1_2_x86_64.whl",
    "ujson-5.10.0-cp311-cp311-manylinux_2_17_aarch64.whl",
    "ujson-5.10.0-cp311-cp311-win_amd64.whl",
    "ujson-5.10.0-cp311-cp311-macosx_11_0_arm64.whl",
    "ujson-5.10.0-pp310-pypy310_pp73-manylinux_2_17_x86_64.whl",
    "ujson-1.19.win32-py3.2.exe",
    "ujson-1.30-py2.7-linux-x86_64.egg",
]


def _page(filenames: list[str]) -> bytes:
    files = [
        {"filename": name, "url": name, "hashes": {"sha256": f"{i:064x}"}, "requires-python": ">=3.8", "yanked": False}
        for i, name in enumerate(filenames)
    ]
    return json.dumps(
        {"meta": {"api-version": "1.1"}, "name": "ujson", "files": files, "versions": ["5.10.0"]}
    ).encode()


def test_the_sandbox_pip_is_recognised_and_nothing_else() -> None:
    assert interpreter_of(SANDBOX_PIP) == SANDBOX
    pypy = SANDBOX_PIP.replace('"name":"CPython"', '"name":"PyPy"')
    musl = SANDBOX_PIP.replace('"lib":"glibc"', '"lib":"musl"')
    free_threaded_era = SANDBOX_PIP.replace('"version":"3.11.2"', '"version":"3.13.0"')
    abi_flags_era = SANDBOX_PIP.replace('"version":"3.11.2"', '"version":"3.7.9"')
    # Written by code in the sandbox: a huge glibc would cost the orchestrator a tag per minor version.
    huge_glibc = SANDBOX_PIP.replace('"version":"2.36"', '"version":"2.150000"')
    odd_cpu = SANDBOX_PIP.replace('"cpu":"x86_64"', '"cpu":"made_up_cpu"')
    for user_agent in (
        *(None, "", "curl/8.5", "pip/26.3", "pip/26.3 {", "pip/26.3 []", "pip/1 " + "[" * 4000),
        *(pypy, musl, free_threaded_era, abi_flags_era, huge_glibc, odd_cpu),
    ):
        assert interpreter_of(user_agent) is None, user_agent
    no_libc = json.loads(SANDBOX_PIP.partition(" ")[2])
    del no_libc["distro"]["libc"]
    assert interpreter_of("pip/26.3 " + json.dumps(no_libc)) is None


def test_a_page_keeps_exactly_what_the_sandbox_could_install_and_every_field() -> None:
    page = json.loads(_page(KEPT + DROPPED))
    trimmed = trim(_page(KEPT + DROPPED), SANDBOX)
    assert trimmed is not None
    data = json.loads(trimmed)
    assert [entry["filename"] for entry in data["files"]] == KEPT
    assert data["files"] == [entry for entry in page["files"] if entry["filename"] in KEPT]
    assert {key: value for key, value in data.items() if key != "files"} == {
        key: value for key, value in page.items() if key != "files"
    }


def test_a_page_with_nothing_to_drop_or_unreadable_passes_as_is() -> None:
    assert trim(_page(KEPT), SANDBOX) is None
    deep = b'{"files": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    for page in (b"<html></html>", b"{}", b'{"files": 3}', b"\xff", deep):
        assert trim(page, SANDBOX) is None


def test_the_url_names_the_file_as_pip_reads_it() -> None:
    wheel = "ujson-5.10.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    windows = "ujson-5.10.0-cp311-cp311-win_amd64.whl"
    files = [
        {"filename": wheel, "url": f"../../packages/ab/cd/{windows}#sha256=00"},
        {"filename": windows, "url": f"https://files.example/packages/{wheel.replace('+', '%2B')}?x=1"},
    ]
    trimmed = trim(json.dumps({"files": files}).encode(), SANDBOX)
    assert trimmed is not None
    assert json.loads(trimmed)["files"] == files[1:]


@pytest.mark.skipif(
    platform.python_implementation() != "CPython" or platform.libc_ver()[0] != "glibc" or sys.version_info >= (3, 13),
    reason="compares with this machine's own interpreter, a CPython on glibc",
)
def test_every_tag_this_interpreter_accepts_is_kept() -> None:
    libc = platform.libc_ver()[1].split(".")
    here = Interpreter(sys.version_info[:2], (int(libc[0]), int(libc[1])), platform.machine())
    assert set(sys_tags()) <= supported_tags(here)
