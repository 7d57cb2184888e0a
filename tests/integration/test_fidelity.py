"""A differential test: the same cells on a Jupyter kernel and on the runner's interpreter, compared item by item.

Both run inside one hardened sandbox container of the real image (``fidelity_driver.py``), one after
the other, and both kernels' messages go through the runner's ``OutputCollector``: what differs is
what a TCI caller would see differ. Every intended difference is listed in ``INTENDED`` (and in
PROTOCOL.md, "Interpreter") with what the interpreter shows instead; everything else must match in
types, order and data, after masking what changes from run to run (addresses, timings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from orchestrator.backends import labels

from .conftest import IMAGE

pytestmark = pytest.mark.docker

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="

# (id, code). Cells run in this order in one kernel of each kind, so state carries over as in a session.
CORPUS: list[tuple[str, str]] = [
    ("print", "print('hello')"),
    (
        "flush-interleave",
        "import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\nprint('c', flush=True)",
    ),
    ("interleave", "import sys\nfor i in range(3):\n    print(i)\n    print(-i, file=sys.stderr)"),
    ("no-newline", "print('a', end='')\nprint('b', end='')"),
    ("progress-cr", "for i in range(5):\n    print(f'\\r{i * 25}%', end='', flush=True)\nprint()"),
    ("unicode", "print('héllo wörld ✓ 日本語 🎉')"),
    ("invalid-utf8-fd", "import os\nos.write(1, b'bad \\xff\\xfe bytes\\n')"),
    ("invalid-utf8-shell", "!printf 'x\\377y\\n'"),
    ("image", f"import base64\nfrom IPython.display import Image, display\ndisplay(Image(base64.b64decode('{PNG}')))"),
    ("html", "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))"),
    ("json", "from IPython.display import JSON, display\ndisplay(JSON({'a': [1, 2]}))"),
    ("markdown", "from IPython.display import Markdown\nMarkdown('# Title')"),
    ("display-many", "display(1, 'two', [3])"),
    ("dataframe", "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})\ndf"),
    ("display-dataframe", "display(df.describe())"),
    ("sympy", "import sympy\nx = sympy.symbols('x')\nsympy.integrate(x**2 + sympy.sin(x), x)"),
    ("matplotlib", "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.title('t')"),
    ("plt-show", "plt.plot([3, 1, 2])\nplt.show()\nprint('after show')"),
    ("two-figures", "for i in range(2):\n    plt.figure()\n    plt.plot([i, i + 1])\nplt.show()"),
    ("syntax-error", "def f(:\n    pass"),
    ("indentation-error", "if True:\nprint(1)"),
    (
        "nested-traceback",
        "def a():\n    raise ValueError('inner')\ndef b():\n    try:\n        a()\n"
        "    except ValueError as e:\n        raise RuntimeError('outer') from e\nb()",
    ),
    ("shell-error", "!ls /nonexistent-dir\nprint(_exit_code)"),
    ("shell-raise", "import subprocess\nsubprocess.run(['sh', '-c', 'exit 3'], check=True)"),
    ("timeit", "%timeit -n 1 -r 1 sum(range(10))"),
    ("bash-magic", "%%bash\necho from bash\necho to stderr >&2"),
    ("pip-magic", "%pip --version"),
    ("cd", "%cd /tmp"),
    ("cd-kept", "import os\nprint(os.getcwd())\n%cd /workspace"),
    ("shell-background", "!(sleep 0.2; echo late) &\nprint('returned')"),
    ("input", "input('name? ')"),
    ("getpass", "import getpass\ngetpass.getpass()"),
    ("sys-exit", "import sys\nsys.exit(3)"),
    ("keyboard-interrupt", "raise KeyboardInterrupt"),
    ("warning", "import warnings\nwarnings.warn('careful')"),
    ("deprecation", "import warnings\nwarnings.warn('old', DeprecationWarning)"),
    ("logging", "import logging\nlogging.basicConfig()\nlogging.getLogger('x').warning('logged')"),
    ("main-name", "print(__name__)\nif __name__ == '__main__':\n    print('as main')"),
    ("get-ipython", "ip = get_ipython()\nprint(ip.user_ns['__name__'], callable(ip.run_line_magic))"),
    ("last-expr", "1 + 1\n2 + 2"),
    ("semicolon", "3 + 3;"),
    ("none-result", "None"),
    ("assignment", "y = 5"),
    ("underscore", "_ + 1 if isinstance(_, int) else 0"),
    ("subprocess", "import subprocess\nsubprocess.run(['echo', 'from child'])\nprint('parent')"),
    ("prints-then-child", "import subprocess\nprint('first')\nprint('second')\n_ = subprocess.run(['echo', 'child'])"),
    ("os-system", "import os\nos.system('echo from system')"),
    ("thread", "import threading\nt = threading.Thread(target=lambda: print('from thread'))\nt.start()\nt.join()"),
    ("clear-output", "from IPython.display import clear_output\nprint('gone')\nclear_output()\nprint('kept')"),
    ("update-display", "h = display('first', display_id=True)\nh.update('second')"),
    ("bad-repr", "class Bad:\n    def _repr_html_(self):\n        raise ValueError('no html')\nBad()"),
    ("await", "import asyncio\nawait asyncio.sleep(0)\nprint('awaited')"),
    ("env-magic", "%env TCI_FIDELITY=yes\n!echo $TCI_FIDELITY"),
    ("help", "len?"),
    ("unicode-error", "raise ValueError('ünïcödé ✗')"),
    ("mixed-order", "print('before')\ndisplay('middle')\nprint('after')"),
    ("stderr-only", "import sys\nsys.stderr.write('just stderr\\n')"),
    ("argv", "import sys\nprint(sys.argv)"),
    ("shell-ls", "!echo one; echo two"),
    ("plotly", "import plotly.express as px\npx.line(x=[1, 2], y=[2, 1]).show()"),
    ("tqdm", "from tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass"),
    (
        "history-record",
        "hm = get_ipython().history_manager\nprint(any(hm.outputs.values()), bool(hm.exceptions))",
    ),
    ("capture-shell", "%%capture captured\n!echo hidden\n%pip --version"),
    ("captured-shell-text", "print(captured.stdout.replace('\\r\\n', '\\n').splitlines()[0])"),
    (
        "redirect-shell",
        "import contextlib, io\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n    !echo into buffer\n"
        "print(repr(buf.getvalue().strip()))",
    ),
    ("wide-frame", "import numpy as np\npd.DataFrame(np.arange(60).reshape(2, 30))"),
    ("wide-frame-print", "print(pd.DataFrame(np.arange(75).reshape(3, 25)))"),
    ("breakpoint", "breakpoint()\nprint('after breakpoint')"),
    ("exception-group", "raise ExceptionGroup('many', [ValueError('a'), TypeError('b')])"),
    ("exit-keep-kernel", "exit(keep_kernel=True)\nprint('still here')"),
    ("after-exit-keep-kernel", "print(y)"),
    ("gui-magic", "%gui tk\nimport logging\nlogging.getLogger('after-gui').warning('unconfigured')"),
    ("stderr-then-stdout", "import sys\nprint('e1', file=sys.stderr)\nprint('e2', file=sys.stderr)\nprint('o1')"),
    # Last but one: a Jupyter kernel warns later about the coroutine it never awaited.
    ("asyncio-run", "import asyncio\nasync def f():\n    return 7\nprint(asyncio.run(f()))"),
    ("exit", "exit()"),
]

# Each mask is applied to every text in both results before they are compared.
MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"0x[0-9a-f]+"), "0x?"),
    # Cells are named after the kernel's pid.
    (re.compile(r"/ipykernel_\d+/"), "/ipykernel_?/"),
    # %timeit's figures.
    (re.compile(r"\d+(\.\d+)? \S+ ± \d+(\.\d+)? \S+ per loop"), "T ± T per loop"),
]


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        for pattern, repl in MASKS:
            value = pattern.sub(repl, value)
        return value
    if isinstance(value, dict):
        return {key: _mask(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask(item) for item in value]
    return value


def _texts(outputs: list[dict[str, Any]], kind: str) -> str:
    """The concatenated data of every output of type ``kind``."""
    return "".join(item["data"] for item in outputs if item["type"] == kind)


Outputs = list[dict[str, Any]]

# Cells whose stdout and stderr interleave by chance in both kernels (no flush between them): each
# stream's text must match, not the order of the two.
UNORDERED = {"interleave", "stderr-then-stdout"}
# Cells whose order is a race in ipykernel alone: a child's output reaches that kernel through a thread
# forwarding the pipe, and can land after what the cell printed next (seen once under CI load). The
# interpreter must show the order the cell produced; Jupyter the same text, in any order.
CAUSAL = {"subprocess": "from child\nparent\n", "prints-then-child": "first\nsecond\nchild\n"}


def _streams(outputs: Outputs) -> str:
    return "".join(item["data"] for item in outputs if item["type"] in ("stdout", "stderr"))


def _piped_shell(jupyter: Outputs, lean: Outputs) -> bool:
    """``!cmd`` runs over pipes, not a pseudo-terminal: ``\n`` line ends, and its stderr stays stderr."""
    others = [item for item in lean if item["type"] not in ("stdout", "stderr")]
    return _streams(lean) == _streams(jupyter).replace("\r\n", "\n") and others == [
        item for item in jupyter if item["type"] not in ("stdout", "stderr")
    ]


def _same_error_other_frame(jupyter: Outputs, lean: Outputs) -> bool:
    """``input()``/``getpass()``: the same exception and message; the last frame is the interpreter's."""
    (theirs,), (ours,) = ([item["data"] for item in out if item["type"] == "error"] for out in (jupyter, lean))
    return ours.splitlines()[-1] == theirs.splitlines()[-1] and ours.splitlines()[:5] == theirs.splitlines()[:5]


# id -> (why the interpreter differs, a check of what it shows given both results). Listed in PROTOCOL.md.
INTENDED: dict[str, tuple[str, Callable[[Outputs, Outputs], bool]]] = {
    "invalid-utf8-fd": (
        "fd-level output keeps its place before the cell's result (ipykernel's pipe thread sends it late)",
        lambda jupyter, lean: (
            sorted(map(str, lean)) == sorted(map(str, jupyter))
            and [o["type"] for o in lean] == ["stdout", "execute_result"]
        ),
    ),
    "invalid-utf8-shell": ("shell escapes run over pipes", _piped_shell),
    "shell-error": ("shell escapes run over pipes", _piped_shell),
    "pip-magic": ("shell escapes run over pipes", _piped_shell),
    "env-magic": ("shell escapes run over pipes", _piped_shell),
    "shell-ls": ("shell escapes run over pipes", _piped_shell),
    "shell-background": (
        "`!cmd &` returns when the shell exits (ipykernel refuses it); the runner stops the rest at the end",
        lambda jupyter, lean: _texts(lean, "stdout") == "returned\n" and "stopped" in _texts(lean, "stderr"),
    ),
    "exception-group": (
        "an exception group is the cell's error output (IPython prints Python's traceback of it to stderr)",
        lambda jupyter, lean: (
            [o["type"] for o in lean] == ["error"]
            and "ExceptionGroup: many (2 sub-exceptions)" in _texts(jupyter, "stderr")
            and "ExceptionGroup: many (2 sub-exceptions)" in lean[0]["data"]
        ),
    ),
    "gui-magic": (
        "`%gui <toolkit>` says on stderr that there is no display (written there: logging.error would configure"
        " the root logger for the rest of the session)",
        lambda jupyter, lean: (
            _texts(lean, "stderr")
            == "GUI event loop 'tk' is not available: the sandbox has no display\n" + _texts(jupyter, "stderr")
        ),
    ),
    "input": ("the interpreter raises it, not ipykernel", _same_error_other_frame),
    "getpass": ("the interpreter raises it, not ipykernel", _same_error_other_frame),
    "asyncio-run": (
        "cells do not run inside an event loop, so asyncio.run() works",
        lambda jupyter, lean: (
            lean == [{"type": "stdout", "data": "7\n"}] and "RuntimeError" in _texts(jupyter, "error")
        ),
    ),
    "tqdm": (
        "tqdm.auto is the text bar, without the TqdmWarning about missing ipywidgets",
        lambda jupyter, lean: (
            "TqdmWarning" in str(jupyter)
            and [o["type"] for o in lean] == ["stderr"]
            and "3/3" in lean[0]["data"]
            and "Warning" not in lean[0]["data"]
        ),
    ),
    "history-record": (
        "IPython's record of earlier cells' printed text, results and errors (kept for %notebook) is not kept",
        lambda jupyter, lean: (
            jupyter == [{"type": "stdout", "data": "True True\n"}]
            and lean == [{"type": "stdout", "data": "False False\n"}]
        ),
    ),
    "argv": (
        "sys.argv holds no launcher arguments (argparse in a cell sees none)",
        lambda jupyter, lean: lean == [{"type": "stdout", "data": "['']\n"}],
    ),
}


@pytest.fixture(scope="module")
def results(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("fidelity")
    (work / "corpus.json").write_text(json.dumps([{"id": cid, "code": code} for cid, code in CORPUS]))
    (work / "fidelity_driver.py").write_text((Path(__file__).parent / "fidelity_driver.py").read_text())
    work.chmod(0o755)
    for path in work.iterdir():
        path.chmod(0o644)
    container = docker_client.containers.run(
        IMAGE,
        entrypoint=["/opt/venv/bin/python", "/fidelity/fidelity_driver.py", "/fidelity/corpus.json"],
        detach=True,
        labels={labels.TEST_RUN: "it-fidelity"},
        volumes={str(work): {"bind": "/fidelity", "mode": "ro"}},
        read_only=True,
        user="10001:10001",
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=512,
        mem_limit="3g",
        tmpfs={
            "/tmp": "rw,nosuid,nodev,size=256m",
            "/home/sandbox": "rw,nosuid,nodev,size=256m,uid=10001,gid=10001,mode=0700",
            "/workspace": "rw,nosuid,nodev,size=256m,uid=10001,gid=10001,mode=0700",
            "/opt/venv/local": "rw,nosuid,nodev,size=256m,uid=10001,gid=10001,mode=0700",
        },
    )
    try:
        status = container.wait(timeout=600)
        stdout = container.logs(stdout=True, stderr=False).decode()
        stderr = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, stderr[-4000:]
    (line,) = (line for line in stdout.splitlines() if line.startswith("FIDELITY-REPORT:"))
    return json.loads(line.removeprefix("FIDELITY-REPORT:"))


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40
    assert len({cid for cid, _ in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("cell", [cid for cid, _ in CORPUS])
def test_the_interpreter_shows_what_a_jupyter_kernel_shows(results: dict[str, Any], cell: str) -> None:
    jupyter, lean = results[cell]["jupyter"], results[cell]["lean"]
    if cell in INTENDED:
        why, check = INTENDED[cell]
        assert check(jupyter, lean), f"{cell}: {why}; the interpreter showed {lean!r}, Jupyter {jupyter!r}"
        return
    if cell in UNORDERED:
        for kind in ("stdout", "stderr"):
            assert _texts(lean, kind) == _texts(jupyter, kind)
        # The interpreter sends a stream's first lines only after what the other stream printed before them.
        if cell == "stderr-then-stdout":
            assert [o["type"] for o in lean] == ["stderr", "stdout"], lean
        return
    if cell in CAUSAL:
        assert lean == [{"type": "stdout", "data": CAUSAL[cell]}]
        # Jupyter shows the same text, in some order: its print and its fd capture travel through different
        # threads, and under load the child's line can even land inside "parent\n" (print writes the
        # newline apart), so only the characters are compared.
        assert sorted(_texts(jupyter, "stdout")) == sorted(CAUSAL[cell]), jupyter
        return
    assert _mask(lean) == _mask(jupyter)
