"""IPython's input transformations, skipped for a cell they would leave as it is.

Before it runs a cell, IPython rewrites its special syntax (``%magic``, ``!cmd``, ``a = !cmd``,
``obj?``, pasted ``>>>`` prompts, a common indentation) by tokenizing the whole cell in pure Python,
once more per rewrite: for plain Python that is most of the interpreter's CPU per execute (0.8 of
1.8 ms for a 2 KB cell, more than compiling and running it). A cell whose text has none of what
those rewrites look for, and which Python's own parser accepts (so tokenizing it could not fail
either), comes out unchanged but for a final newline; such a cell skips them, and the parse that
showed it plain is the one IPython's compiler then uses. Anything else takes IPython's own path, so
what a cell means and the errors it shows stay IPython's.
"""

from __future__ import annotations

import ast
import contextlib
import re
import warnings
from typing import Any, Final, cast

from IPython.core.inputtransformer2 import TransformerManager

# What a line may start with to be a magic, a shell escape, help or an autocall (IPython's escapes).
_ESCAPES: Final = frozenset("!?%,;/")
# An assignment from a magic or a shell command (a = %time f(), b = !ls), across continuations.
_ASSIGNED: Final = re.compile(r"=\s*(?:\\\s*)*[%!]")
# Prompts of pasted sessions: >>> and ... (Python), In [1]: and ...: (IPython).
_PROMPT: Final = re.compile(r"^\s*(?:>>>|\.\.\.|(?:\[nav\]|\[ins\])?\s*In \[|\.{3,}:)")
# Lines of spaces and tabs only: IPython's dedent empties them, inside strings too.
_SPACES_ONLY: Final = re.compile(r"^[ \t]+$", re.MULTILINE)
# The file name of the parse that shows a cell plain, and the filter that makes its warnings errors.
_PARSE_NAME: Final = "<tci-plain-cell-check>"
_PARSE_WARNINGS_ARE_ERRORS: Final = ("error", None, Warning, re.compile(re.escape(_PARSE_NAME) + r"\Z"), 0)
# Line breaks other than "\n": IPython's tokenizing splits lines at them (str.splitlines), Python's
# parser does not, so the two can disagree about indentation.
_OTHER_BREAKS: Final = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def free_of_ipython_syntax(cell: str) -> bool:
    """Whether ``cell`` has nothing IPython's static transformations act on (a check of its text only)."""
    if not cell or cell[0].isspace() or _OTHER_BREAKS.search(cell):
        return False
    if _ASSIGNED.search(cell) or _SPACES_ONLY.search(cell):
        return False
    for line in cell.split("\n"):
        stripped = line.strip()
        if stripped[:1] in _ESCAPES or stripped.rstrip("\\").rstrip().endswith("?") or _PROMPT.match(line):
            return False
    return True


class Parses:
    """The parse of the last cell found plain, kept for the compiler's parse of the same text."""

    def __init__(self) -> None:
        self._last: tuple[str, int, ast.Module] | None = None

    def parse(self, source: str, flags: int) -> ast.Module:
        """``source`` parsed as IPython's compiler parses a cell with ``flags``.

        A warning the parse would give (an invalid escape sequence, say) is raised instead, so that
        such a cell takes IPython's path and its warning comes from IPython's own parse, under the
        cell's name. The filter that does so is scoped to this parse's own file name: a warning from
        anywhere else (a thread of the user's) is untouched, and the filters' version is not bumped
        (``catch_warnings`` would make every "default" warning show again after each cell).
        """
        self._last = None
        filters = cast(list[Any], warnings.filters)  # looked up each time: catch_warnings rebinds it
        filters.insert(0, _PARSE_WARNINGS_ARE_ERRORS)
        try:
            tree: ast.Module = compile(source, _PARSE_NAME, "exec", flags | ast.PyCF_ONLY_AST, dont_inherit=True)
        finally:
            with contextlib.suppress(ValueError):
                filters.remove(_PARSE_WARNINGS_ARE_ERRORS)
        self._last = (source, flags, tree)
        return tree

    def take(self, source: str, flags: int) -> ast.Module | None:
        """The kept parse if it is of ``source`` with ``flags`` (once: IPython may change the tree)."""
        last, self._last = self._last, None
        if last is not None and last[1] == flags and last[0] == source:
            return last[2]
        return None


class CellTransformer(TransformerManager):
    """IPython's ``TransformerManager`` that returns a cell it would not change without tokenizing it.

    ``shell`` is set once the shell exists: its compiler's flags are those of the parse that shows a
    cell plain, which its compiler then takes (``reusing_parses``).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._defaults = (list(self.cleanup_transforms), list(self.line_transforms), list(self.token_transformers))
        self.parses = Parses()
        self.shell: Any = None

    def unchanged(self, cell: str) -> bool:
        """Whether IPython's static transformations would return ``cell`` as it is (plus a final newline)."""
        # An extension that adds a transformation of its own makes every cell take IPython's path.
        if (self.cleanup_transforms, self.line_transforms, self.token_transformers) != self._defaults:
            return False
        if not free_of_ipython_syntax(cell):
            return False
        source = cell if cell.endswith("\n") else cell + "\n"
        try:
            self.parses.parse(source, self.shell.compile.flags if self.shell is not None else 0)
        except Exception:  # noqa: BLE001 - SyntaxError, a warning, MemoryError...: IPython's path shows it
            return False
        return True

    def transform_cell(self, cell: str) -> str:
        if self.unchanged(cell):
            return cell if cell.endswith("\n") else cell + "\n"
        return str(super().transform_cell(cell))


def reusing_parses(compiler_class: type, transformer: CellTransformer) -> type:
    """A subclass of IPython's cell compiler class whose ``ast_parse`` first takes ``transformer``'s parse."""

    class Compiler(compiler_class):  # type: ignore[misc]
        def ast_parse(self, source: str, filename: str = "<unknown>", symbol: str = "exec") -> Any:
            if symbol == "exec":
                tree = transformer.parses.take(source, self.flags)
                if tree is not None:
                    return tree
            return super().ast_parse(source, filename, symbol)

    Compiler.__name__ = Compiler.__qualname__ = compiler_class.__name__
    return Compiler
