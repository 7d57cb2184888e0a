"""Outputs of a real kernel as the runner reports them: streams, MIME bundles, errors, plots, shell escapes."""

from __future__ import annotations

import base64
import json

import pytest

pytestmark = pytest.mark.anyio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(data: str) -> None:
    raw = base64.b64decode(data, validate=True)
    assert raw.startswith(PNG_MAGIC)
    assert len(raw) > 1000, "a rendered figure is more than a header"


async def test_state_persists_across_executes(runner):
    first = await runner.execute("counter = 41\nimport math")
    assert first.outcome == "ok"
    assert first.outputs == []
    second = await runner.execute("counter += 1\nprint(counter, math.pi > 3)")
    assert second.outcome == "ok"
    assert second.outputs == [{"type": "stdout", "data": "42 True\n"}]
    assert second.result["state_lost"] is False
    assert second.result["execution_count"] == first.result["execution_count"] + 1


async def test_stdout_and_stderr_keep_their_order(runner):
    result = await runner.execute(
        "import sys\nprint('out 1')\nsys.stdout.flush()\nprint('err 1', file=sys.stderr)\nsys.stderr.flush()\n"
        "print('out 2')"
    )
    assert result.outcome == "ok"
    assert result.outputs == [
        {"type": "stdout", "data": "out 1\n"},
        {"type": "stderr", "data": "err 1\n"},
        {"type": "stdout", "data": "out 2\n"},
    ]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # Lines printed together wait in the stream's buffer; what a child or os.write adds after them follows them.
        ("import subprocess\nprint('a')\nprint('b')\nsubprocess.run(['echo', 'c'])\nprint('d')", "a\nb\nc\nd\n"),
        ("import os, time\nprint('a')\nprint('b')\nos.write(1, b'c\\n')\ntime.sleep(0.2)", "a\nb\nc\n"),
        ("import os\nos.write(1, b'x\\n')\nprint('y')\n_ = os.write(1, b'z\\n')", "x\ny\nz\n"),
        ("import os, sys, time\nprint('a', end='')\nos.write(1, b'b')\ntime.sleep(0.1)\nprint('c')", "abc\n"),
    ],
)
async def test_printed_text_and_descriptor_output_keep_their_order(runner, code, expected):
    for _ in range(3):
        result = await runner.execute(code)
        assert result.outcome == "ok"
        assert result.outputs == [{"type": "stdout", "data": expected}]


# The cell keeps the GIL (a long switch interval, a busy wait) until its child has exited, so the output
# thread can hardly run before the cell ends: the order must not depend on it having run.
_STARVED = """import os, subprocess, sys, time
sys.setswitchinterval(60)
try:
    print('a')
    print('b')
    {start}
    while not _exited():
        pass
finally:
    sys.setswitchinterval(0.005)
"""


@pytest.mark.parametrize(
    ("start", "exited"),
    [
        ("child = subprocess.Popen(['echo', 'c'])", "lambda: child.poll() is not None"),
        (
            "pid = os.fork()\n    if pid == 0:\n        os.write(1, b'c\\n')\n        os._exit(0)",
            "lambda: os.waitpid(pid, os.WNOHANG)[0] == pid",
        ),
        ("os.system('echo c')", "lambda: True"),
        ("get_ipython().system('echo c')", "lambda: True"),
    ],
    ids=["popen", "fork", "os.system", "shell-escape"],
)
async def test_lines_printed_before_a_child_starts_come_before_its_output(runner, start, exited):
    code = f"_exited = {exited}\n" + _STARVED.format(start=start)
    for _ in range(3):
        result = await runner.execute(code)
        assert result.outcome == "ok", result.outputs
        assert result.outputs == [{"type": "stdout", "data": "a\nb\nc\n"}]


async def test_consecutive_stream_chunks_are_merged(runner):
    # Each flush sends its own stream message; the runner joins adjacent ones of the same stream.
    result = await runner.execute(
        "import sys, time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.02)"
    )
    assert result.outputs == [{"type": "stdout", "data": "0\n1\n2\n3\n4\n"}]


async def test_execute_result_is_a_mime_bundle(runner):
    result = await runner.execute(
        "class Rich:\n"
        "    def __repr__(self):\n        return 'Rich()'\n"
        "    def _repr_html_(self):\n        return '<b>rich</b>'\n"
        "    def _repr_json_(self):\n        return {'a': [1, 2]}\n"
        "Rich()"
    )
    assert result.outcome == "ok"
    assert result.outputs == [
        {
            "type": "execute_result",
            "data": {"text/plain": "Rich()", "text/html": "<b>rich</b>", "application/json": {"a": [1, 2]}},
        }
    ]


async def test_display_data(runner):
    result = await runner.execute(
        "from IPython.display import HTML, display\ndisplay(HTML('<p>hello</p>'))\nprint('after')"
    )
    assert result.outcome == "ok"
    kinds = [o["type"] for o in result.outputs]
    assert kinds == ["display_data", "stdout"]
    data = result.outputs[0]["data"]
    assert data["text/html"] == "<p>hello</p>"
    assert data["text/plain"] == "<IPython.core.display.HTML object>"


async def test_error_has_a_plain_text_traceback(runner):
    result = await runner.execute("print('before')\ndef f():\n    return 1 / 0\nf()")
    assert result.outcome == "error"
    assert result.result["error_summary"] == "ZeroDivisionError: division by zero"
    assert result.of("stdout") == ["before\n"]
    (traceback,) = result.of("error")
    assert "\x1b" not in traceback, "IPython's colour codes must be stripped"
    assert "ZeroDivisionError" in traceback
    assert "return 1 / 0" in traceback, "the traceback shows the failing line"
    # The error does not poison the session.
    assert (await runner.execute("print('fine')")).outcome == "ok"


async def test_syntax_error(runner):
    result = await runner.execute("def broken(:\n    pass")
    assert result.outcome == "error"
    assert result.result["error_summary"].startswith("SyntaxError")
    assert "\x1b" not in result.text("error")


async def test_plt_show_gives_a_png(runner):
    result = await runner.execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
    assert result.outcome == "ok", result.outputs
    (display,) = result.of("display_data")
    assert display["text/plain"] == "<Figure size 640x480 with 1 Axes>"
    assert_png(display["image/png"])


async def test_figure_left_open_is_shown_at_the_end_of_the_cell(runner):
    result = await runner.execute(
        "import matplotlib.pyplot as plt\nfig, axes = plt.subplots(1, 2)\naxes[0].bar(['a', 'b'], [3, 5])\n"
        "print('drawn')"
    )
    assert result.outcome == "ok", result.outputs
    assert [o["type"] for o in result.outputs] == ["stdout", "display_data"]
    display = result.outputs[1]["data"]
    assert display["text/plain"] == "<Figure size 640x480 with 2 Axes>"
    assert_png(display["image/png"])
    # Shown figures are closed: the next cell does not repeat them.
    assert (await runner.execute("print(len(plt.get_fignums()))")).outputs == [{"type": "stdout", "data": "0\n"}]


async def test_shell_escape(runner):
    result = await runner.execute("!echo hi")
    assert result.outcome == "ok"
    assert result.outputs == [{"type": "stdout", "data": "hi\n"}]


async def test_shell_escape_keeps_stderr_apart(runner):
    result = await runner.execute("!echo to-out; echo to-err >&2")
    assert result.text("stdout") == "to-out\n"
    assert result.text("stderr") == "to-err\n"


async def test_a_redirected_cell_gets_its_shell_escapes_output(runner):
    # %%capture (a common way to hide install noise) and redirect_stdout catch `!cmd` as in ipykernel.
    captured = await runner.execute("%%capture cap\n!echo out; echo err >&2\n%pip --version")
    assert captured.outcome == "ok"
    assert captured.outputs == []
    shown = await runner.execute("print(repr(cap.stdout[:4]), repr(cap.stderr))")
    assert shown.outputs == [{"type": "stdout", "data": "'out\\n' 'err\\n'\n"}]
    # A command the shell left running keeps the pipe open: the escape still returns when the shell exits.
    background = await runner.execute(
        "import contextlib, io\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n"
        "    !(sleep 600; echo late) & echo now\nprint(repr(buf.getvalue()))",
        timeout=30,
    )
    assert background.outcome == "ok", background.outputs
    assert background.text("stdout") == "'now\\n'\n"


async def test_a_gui_magic_says_there_is_no_display_and_leaves_logging_unconfigured(fresh_runner):
    said = await fresh_runner.execute("%gui tk")
    assert said.outputs == [
        {"type": "stderr", "data": "GUI event loop 'tk' is not available: the sandbox has no display\n"}
    ]
    # Through logging.error, the root logger would have a handler, and the cell's basicConfig would do nothing.
    handlers = await fresh_runner.execute("import logging\nprint(logging.getLogger().handlers)")
    assert handlers.outputs == [{"type": "stdout", "data": "[]\n"}]


async def test_a_thread_printing_across_cells_never_blocks_their_end(fresh_runner):
    started = await fresh_runner.execute(
        "import threading, time\nspin = True\ndef chatter():\n    while spin:\n        print('x')\n"
        "        time.sleep(0.0001)\nthreading.Thread(target=chatter, daemon=True).start()"
    )
    assert started.outcome == "ok"
    for _ in range(300):
        assert (await fresh_runner.execute("pass", timeout=10)).outcome == "ok"
    assert (await fresh_runner.execute("spin = False")).outcome == "ok"


async def test_shell_escapes_with_unusual_streams(runner):
    # sys.stdout set to None: the command's output goes to the descriptor, as before the cell redirected it.
    none = await runner.execute("import sys\nsys.stdout = None\n!echo to the descriptor")
    assert none.text("stdout") == "to the descriptor\n", none.outputs
    # A stream that refuses the output: the cell fails, and the command does not outlive it.
    failing = await runner.execute(
        "import contextlib\nclass Refuses:\n    def write(self, text):\n        raise OSError('no room')\n"
        "    def flush(self):\n        pass\n"
        "with contextlib.redirect_stdout(Refuses()):\n    !echo one; sleep 29.37; echo two"
    )
    assert failing.outcome == "error"
    assert "no room" in failing.text("error")
    # A duration of its own: this runner runs on the host, whose every process ps lists.
    left = await runner.execute("!ps -eo args | grep -c '[s]leep 29.37'")
    assert left.text("stdout") == "0\n"


async def test_an_error_whose_contexts_form_a_loop_is_reported(runner):
    result = await runner.execute(
        "a, b = ValueError('a'), ValueError('b')\na.__context__ = b\nb.__context__ = a\nraise a", timeout=20
    )
    assert result.outcome == "error", result.outputs


async def test_uploaded_script_runs_through_the_shell(runner):
    script = "import sys\nprint('script says', sys.argv[1:])\n"
    result = await runner.execute("!python myscript.py one two", files=[{"name": "myscript.py", "content": script}])
    assert result.outcome == "ok", result.outputs
    assert result.outputs == [{"type": "stdout", "data": "script says ['one', 'two']\n"}]


async def test_magics(runner):
    pwd = await runner.execute("%pwd")
    assert pwd.outputs == [{"type": "execute_result", "data": {"text/plain": repr(str(runner.workdir))}}]
    timed = await runner.execute("%time sum(range(10))")
    assert timed.outcome == "ok"
    assert "Wall time" in timed.text("stdout")
    assert timed.of("execute_result") == [{"text/plain": "45"}]


async def test_fd_level_output_at_the_end_of_a_cell(runner):
    # Written to file descriptor 1 by a child process just before the cell ends: it must not be lost.
    for attempt in range(5):
        result = await runner.execute(f"import os\n_ = os.system('echo from-a-shell-{attempt}')")
        assert result.outputs == [{"type": "stdout", "data": f"from-a-shell-{attempt}\n"}]


async def test_rebinding_sys_stdout(runner):
    result = await runner.execute("import io, sys\nsaved = sys.stdout\nsys.stdout = io.StringIO()\nprint('hidden')")
    assert result.outcome == "ok"
    assert result.outputs == []
    assert (await runner.execute("captured = sys.stdout.getvalue()\nsys.stdout = saved")).outcome == "ok"
    # ipykernel addresses the restored stream to the next execute, not to the one that restores it.
    restored = await runner.execute("print(repr(captured))")
    assert restored.outputs == [{"type": "stdout", "data": "'hidden\\n'\n"}]


async def test_invalid_utf8_on_a_file_descriptor(runner):
    result = await runner.execute("import os, sys\nos.write(1, b'\\xff\\xfe ok\\n')")
    assert result.outcome == "ok"
    text = result.text("stdout")
    assert text.endswith(" ok\n")
    assert "\ufffd" in text
    json.dumps(result.result)  # the reply is plain JSON again
    assert (await runner.execute("print('next')")).outputs == [{"type": "stdout", "data": "next\n"}]


async def test_lone_surrogate(runner):
    result = await runner.execute("print('a\\udcffb')")
    assert result.outcome == "ok"
    text = result.text("stdout")
    assert text.startswith("a")
    assert text.endswith("b\n")
    assert "\udcff" not in text
    assert len(text) == 4, "the surrogate became exactly one replacement character"
    text.encode("utf-8")  # strictly encodable
    assert (await runner.execute("print('next')")).outputs == [{"type": "stdout", "data": "next\n"}]


async def test_stats_counters_advance(runner):
    before = await runner.stats()
    await runner.execute("pass")
    after = await runner.stats()
    assert after["execute_count"] == before["execute_count"] + 1
    assert after["last_execute_at"] > (before["last_execute_at"] or 0)
    assert after["kernel_ready"] is True
    assert after["kernel_pid"] == before["kernel_pid"]
    assert after["started_at"] == before["started_at"]


async def test_reply_reports_duration_and_no_drops(runner):
    result = await runner.execute("import time\ntime.sleep(0.2)")
    assert result.outcome == "ok"
    assert result.result["dropped_bytes"] == {}
    assert 200 <= result.result["duration_ms"] < 10_000


async def test_what_cells_printed_is_not_kept_in_the_interpreter_after_them(runner):
    # IPython records every write of every cell (for ``%notebook``) and never lets go: a chatty loop grew the
    # interpreter by ~40 MB a cell here, until the session ran out of memory long after the cell that did it.
    chatty = "for i in range(200_000):\n    print(str(i) * 20)"
    resident = "print(next(line for line in open('/proc/self/status') if line.startswith('VmRSS')).split()[1])"

    async def resident_kib() -> int:
        result = await runner.execute(resident)
        assert result.outcome == "ok", result.outputs
        return int(result.text("stdout"))

    assert (await runner.execute(chatty)).result["dropped_bytes"]["stdout"] > 0
    before = await resident_kib()
    for _ in range(2):
        assert (await runner.execute(chatty)).outcome == "ok"
    assert await resident_kib() - before < 24 * 1024


async def test_the_interpreter_is_ipython_without_jupyter_and_user_code_can_still_import_it(runner):
    code = "import sys\nprint(type(get_ipython()).__name__, 'zmq' in sys.modules, 'ipykernel' in sys.modules)\n"
    code += "import debugpy, ipykernel\nprint(debugpy.__name__)"
    result = await runner.execute(code)
    assert result.outcome == "ok", result.outputs
    assert result.text("stdout") == "LeanShell False False\ndebugpy\n"


async def test_the_interpreter_starts_without_asyncio(fresh_runner):
    # Its start-up is every cold session's long pole: asyncio (and through it ssl and OpenSSL's
    # libraries) loads when a cell needs it, and top-level await still works.
    first = await fresh_runner.execute("import sys; print(sorted({'asyncio', 'ssl'} & set(sys.modules)))")
    assert first.outputs == [{"type": "stdout", "data": "[]\n"}]
    awaited = await fresh_runner.execute("import asyncio\nawait asyncio.sleep(0)\nprint('awaited')")
    assert awaited.outputs == [{"type": "stdout", "data": "awaited\n"}]


async def test_top_level_async_forms_run_as_coroutines(runner):
    # A cell is only checked for top-level await when it holds the word; these do, in every form.
    code = (
        "import asyncio, contextlib\n"
        "async def gen():\n    yield 1\n"
        "@contextlib.asynccontextmanager\nasync def ctx():\n    yield 'ω'\n"
        "async for item in gen():\n    print(item)\n"
        "async with ctx() as value:\n    print(value)\n"
        "await asyncio.sleep(0)"
    )
    result = await runner.execute(code)
    assert result.outputs == [{"type": "stdout", "data": "1\nω\n"}]
    plain = await runner.execute("'no await here: async is a word in this string'")
    assert plain.outputs == [
        {"type": "execute_result", "data": {"text/plain": "'no await here: async is a word in this string'"}}
    ]


async def test_a_shell_escapes_output_comes_before_what_the_cell_prints_after_it(runner):
    # Holding the channel's lock keeps the output thread from reading the pipes (it reads under that
    # lock), as a slow or starved output thread would: the escape itself must hand its output on.
    code = (
        "with get_ipython().capture._channel.lock:\n"
        "    get_ipython().system('ls /nonexistent-dir')\n"
        "    print(_exit_code, flush=True)\n"
    )
    for _ in range(3):
        result = await runner.execute(code)
        assert result.outcome == "ok", result.outputs
        assert [o["type"] for o in result.outputs] == ["stderr", "stdout"], result.outputs
        assert result.outputs[1]["data"] == "2\n"
