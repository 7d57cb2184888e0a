"""Output caps: what is kept, and a marker that says exactly how much was dropped."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.anyio

STREAM_CAP = 1000
TOTAL_CAP = 5000


@pytest.fixture(scope="module")
async def runner(start_runner):
    async with start_runner(
        TCI_RUNNER_MAX_STREAM_BYTES=str(STREAM_CAP), TCI_RUNNER_MAX_OUTPUT_BYTES=str(TOTAL_CAP)
    ) as handle:
        yield handle


def marker(stream: str, dropped: int) -> str:
    return f"\n[{stream} truncated: {dropped} bytes dropped]\n"


@pytest.mark.parametrize(
    ("code", "char"),
    [
        pytest.param("print('x' * 9999)", "x", id="print"),
        pytest.param("import os\n_ = os.write(1, b'y' * 10000)", "y", id="file-descriptor"),
        pytest.param("!python -c \"print('z' * 9999)\"", "z", id="subprocess"),
        pytest.param("for _ in range(100):\n    print('w' * 99)", None, id="many-chunks"),
    ],
)
async def test_stdout_cap(runner, code, char):
    result = await runner.execute(code)
    assert result.outcome == "ok", result.outputs
    (stdout,) = result.of("stdout")
    kept, _, tail = stdout.partition("\n[")
    assert "[" + tail == marker("stdout", 9000).lstrip("\n")
    if char is not None:
        assert kept == char * STREAM_CAP
    else:
        assert len(kept.replace("\n", "")) + kept.count("\n") == STREAM_CAP
    assert len(stdout.encode()) <= STREAM_CAP + len(marker("stdout", 9000))
    assert result.result["dropped_bytes"] == {"stdout": 9000}


async def test_stderr_is_capped_separately(runner):
    result = await runner.execute("import sys\nprint('e' * 1999, file=sys.stderr)\nprint('o' * 10)")
    assert result.of("stderr") == ["e" * STREAM_CAP + marker("stderr", 1000)]
    assert result.of("stdout") == ["o" * 10 + "\n"]
    assert result.result["dropped_bytes"] == {"stderr": 1000}


async def test_cap_cuts_at_a_character_boundary(runner):
    # 'a' + 1000 two-byte characters + newline = 2002 bytes; 999 fit without splitting a character.
    result = await runner.execute("print('a' + 'é' * 1000)")
    (stdout,) = result.of("stdout")
    assert stdout == "a" + "é" * 499 + marker("stdout", 1003)
    assert result.result["dropped_bytes"] == {"stdout": 1003}


async def test_counters_reset_for_each_execute(runner):
    assert (await runner.execute("print('x' * 5000)")).result["dropped_bytes"] == {"stdout": 4001}
    result = await runner.execute("print('v' * 998)")
    assert result.outputs == [{"type": "stdout", "data": "v" * 998 + "\n"}]
    assert result.result["dropped_bytes"] == {}


async def test_total_cap_drops_a_big_display(runner):
    result = await runner.execute(
        "from IPython.display import display\ndisplay({'text/plain': 'p' * 6000}, raw=True)\n"
        "display({'text/plain': 'small'}, raw=True)\nprint('after')"
    )
    assert result.outcome == "ok"
    assert result.of("display_data") == [{"text/plain": "small"}]
    assert result.of("stdout") == ["after\n"]
    assert result.of("stderr") == ["[1 display outputs truncated: 6000 bytes dropped]\n"]
    assert result.result["dropped_bytes"] == {"display": 6000}


async def test_total_cap_drops_a_big_image(runner):
    result = await runner.execute(
        "import base64\nfrom IPython.display import display\n"
        "png = base64.b64encode(b'\\x89PNG\\r\\n\\x1a\\n' + bytes(4492)).decode()\n"
        "display({'image/png': png, 'text/plain': '<img>'}, raw=True)"
    )
    assert result.of("display_data") == []
    # 6000 base64 characters plus the 5-character text/plain alternative.
    assert result.of("stderr") == ["[1 display outputs truncated: 6005 bytes dropped]\n"]
    assert result.result["dropped_bytes"] == {"display": 6005}


async def test_total_cap_drops_a_matplotlib_figure(runner):
    result = await runner.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
    assert result.outcome == "ok"
    assert result.of("display_data") == []
    (note,) = result.of("stderr")
    match = re.fullmatch(r"\[1 display outputs truncated: (\d+) bytes dropped\]\n", note)
    assert match is not None, note
    assert int(match.group(1)) > TOTAL_CAP
    assert result.result["dropped_bytes"] == {"display": int(match.group(1))}


async def test_total_cap_also_cuts_streams(runner):
    # The display takes 4500 + 64 (its envelope) of the 5000 bytes, the stdout item's envelope 64: only 372
    # bytes of stdout fit after it.
    result = await runner.execute(
        "from IPython.display import display\ndisplay({'text/plain': 'q' * 4500}, raw=True)\nprint('r' * 999)"
    )
    assert result.of("display_data") == [{"text/plain": "q" * 4500}]
    assert result.of("stdout") == ["r" * 372 + marker("stdout", 628)]
    assert result.result["dropped_bytes"] == {"stdout": 628}


async def test_output_items_count_against_the_total(runner):
    """stdout and stderr in turn, a byte at a time: a million items while every byte cap had room."""
    result = await runner.execute(
        "import sys\nfor _ in range(2000):\n"
        "    print(end='o', flush=True)\n"
        "    print(end='e', file=sys.stderr, flush=True)"
    )
    assert len(result.outputs) < 5000 // 64 + 2  # each item's envelope counts 64 bytes of the 5000
    assert set(result.result["dropped_bytes"]) == {"stdout", "stderr"}  # and said so
