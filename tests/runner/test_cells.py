"""The interpreter's input transformer gives exactly what IPython's own gives, for any cell."""

from __future__ import annotations

import ast
import random
import warnings
from pathlib import Path

import pytest
from IPython.core.compilerop import CachingCompiler
from IPython.core.inputtransformer2 import TransformerManager
from sandbox_runner import cells
from sandbox_runner.cells import CellTransformer, reusing_parses

# Cells IPython rewrites (or refuses), each close to plain Python.
SPECIAL = [
    "%time x = 1",
    "%%bash\necho hi",
    "!ls -la",
    "x = !ls",
    "x = \\\n  %time 1",
    "files = !ls | head\nprint(files)",
    "len?",
    "len??",
    "print(1)\nlen?",
    "if True:\n    %pwd",
    "    x = 1\n    y = 2",
    "\n\nx = 1",
    "   \nx = 1",
    ">>> x = 1\n>>> print(x)",
    "In [1]: x = 1\n   ...: print(x)",
    "x = 1\n... ",
    "/print 1",
    ",print a b",
    ";print a b",
    's = """a\n    \nb"""\nprint(repr(s))',
    "def f():\n    return 1\n  \nprint(f())",
    "if True:\n        x = 1\n    y = 2",
    "x = (1,\n  2)\n    y = 3\n  z = 4",
    "x = 'unterminated",
    "print(1 <> 2)",
    "x = 1 # why?",
    # Line breaks that IPython's tokenizing splits at and Python's parser does not.
    "s = 'a\x0c    b\x0c  c'",
    "s = 'a\u2028    b\u2028  c'",
    "# a\x0c    b\x0c  c\nx = 1",
    "x = 1 + \\\r    2 + \\\r  3\r",
    "s = 'a\u2028b'",
    # Python's parser gives up (MemoryError) where IPython's tokenizing does not.
    "x = " + "-" * 20000 + "1",
    "a = 5\na?\\\n",
]

PLAIN = [
    "print(1)",
    "x = 1",
    "x = 1\n",
    "def f(a, b=2):\n    return a % b != 0\n\nprint(f(7))",
    "s = 'Continue? [y/n]'\nprint(s)",
    "import re\nprint(re.findall(r'\\d+%', 'a 10% b'))",
    "x = {'a': 1}\nprint(x['a'] / 2)",
    "for i in range(3):\n    print(i, end='')\n",
    "class A:\n    '''doc\n\n    more'''\n    x = 1",
    "await something()",
]


def _both(cell: str) -> tuple[object, object]:
    def run(manager: TransformerManager) -> object:
        try:
            return manager.transform_cell(cell)
        except Exception as exc:  # noqa: BLE001 - the exception is the result to compare
            return (type(exc), str(exc))

    return run(TransformerManager()), run(CellTransformer())


@pytest.mark.parametrize("cell", SPECIAL + PLAIN)
def test_the_same_result_as_ipython(cell: str) -> None:
    ipython, ours = _both(cell)
    assert ours == ipython


@pytest.mark.parametrize("cell", SPECIAL)
def test_special_syntax_takes_ipythons_path(cell: str) -> None:
    assert not CellTransformer().unchanged(cell)


@pytest.mark.parametrize("cell", PLAIN)
def test_plain_python_skips_the_transformations(cell: str) -> None:
    assert CellTransformer().unchanged(cell)


def test_the_same_result_on_real_code() -> None:
    """Runs of top-level statements from the project's own sources: every plain one matches IPython's result."""
    root = Path(__file__).resolve().parents[2]
    taken = 0
    for path in sorted((root / "orchestrator").rglob("*.py")) + sorted((root / "sandbox-image").rglob("*.py")):
        lines = path.read_text().splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line[:1] and not line[:1].isspace()] + [len(lines)]
        for first, last in zip(starts, starts[3:], strict=False):
            cell = "".join(lines[first:last])
            if CellTransformer().unchanged(cell):
                taken += 1
                assert CellTransformer().transform_cell(cell) == TransformerManager().transform_cell(cell), path
    assert taken > 100


def test_an_added_transformation_applies_to_every_cell() -> None:
    manager = CellTransformer()
    manager.line_transforms.append(lambda lines: [line.replace("1", "2") for line in lines])
    assert manager.transform_cell("print(1)") == "print(2)\n"


def test_the_compiler_takes_the_parse_that_showed_a_cell_plain() -> None:
    transformer = CellTransformer()
    compiler = reusing_parses(CachingCompiler, transformer)()
    transformer.shell = type("Shell", (), {"compile": compiler, "execution_count": 1})()
    source = transformer.transform_cell("x = 1")
    kept = transformer.parses._last
    assert kept is not None
    assert compiler.ast_parse(source, "cell-1") is kept[2]
    # Once only, and never for other text: IPython may change the tree it was given.
    assert compiler.ast_parse(source, "cell-1") is not kept[2]
    transformer.transform_cell("y = 2")
    other = compiler.ast_parse("y = 3\n", "cell-2")
    assert isinstance(other.body[0], ast.Assign)
    assert other.body[0].value.value == 3  # type: ignore[attr-defined]


def test_the_cell_name_hash_matches_ipykernels() -> None:
    """Cells are named by a hash of their text (as in a Jupyter kernel); the faster one gives the same names."""
    from ipykernel.compiler import murmur2_x86 as ipykernels
    from sandbox_runner.shell import murmur2_x86

    rnd = random.Random(7)
    alphabet = "ab \n\t=()" + "é€😀\u2028"
    for length in [*range(40), 1000, 4097]:
        text = "".join(rnd.choice(alphabet) for _ in range(length))
        for seed in (0, 0xC70F6907, 0xFFFFFFFF):
            assert murmur2_x86(text, seed) == ipykernels(text, seed), (length, seed)


def test_a_cell_whose_parse_warns_takes_ipythons_path_and_warns_once_under_its_name() -> None:
    transformer = CellTransformer()
    compiler = reusing_parses(CachingCompiler, transformer)()
    transformer.shell = type("Shell", (), {"compile": compiler, "execution_count": 5})()
    cell = "x = '\\d'"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not transformer.unchanged(cell)
        source = transformer.transform_cell(cell)
        assert caught == []
        name = compiler.cache(source, 5, raw_code=cell)
        compiler.ast_parse(source, name)
    assert [(str(w.message), w.filename) for w in caught] == [("invalid escape sequence '\\d'", name)]
    assert cells._PARSE_WARNINGS_ARE_ERRORS not in warnings.filters
