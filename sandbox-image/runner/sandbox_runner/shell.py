"""IPython's ``InteractiveShell`` as the interpreter runs it: Jupyter's behaviour without Jupyter's messaging.

What ipykernel's ``ZMQInteractiveShell`` changes in IPython is done here the same way, so that a cell
shows what it shows in a Jupyter kernel: displays and results as MIME bundles, tracebacks as error
outputs, ``input()`` refused, pager output dropped, the environment variables ipykernel sets. What
differs on purpose is listed in PROTOCOL.md ("Interpreter"). Shell escapes (``!cmd``) write straight
into the captured file descriptors (or, while a cell redirects ``sys.stdout``/``sys.stderr``, as with
``%%capture``, into those streams, as ipykernel's do), and the shell's children run at the lowest priority.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import getpass
import importlib.util
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Final

from IPython.core import page
from IPython.core.autocall import ZMQExitAutocall
from IPython.core.compilerop import CachingCompiler
from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import StdinNotImplementedError
from IPython.core.interactiveshell import InteractiveShell
from traitlets import CBool, Instance, Type, default
from traitlets.config import Config

from .capture import Capture, utf8_decoder
from .cells import CellTransformer, reusing_parses

# Processes the interpreter starts run below it (and far below the runner): a busy background process
# can starve neither the cell that started it nor the interrupt that stops it.
CHILD_NICE: Final = 19
# A KeyboardInterrupt during a shell escape gives the command this long to stop after SIGINT.
_ESCAPE_GRACE: Final = 1.0


class _DisplayHook(DisplayHook):
    """The last expression's value as an ``execute_result``."""

    def start_displayhook(self) -> None:
        super().start_displayhook()  # type: ignore[no-untyped-call]
        self._data: dict[str, Any] | None = None

    def write_output_prompt(self) -> None:
        pass

    def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
        self._data = format_dict

    def finish_displayhook(self) -> None:
        if self._data:
            result = {"type": "execute_result", "data": self._data, "execution_count": self.prompt_count}
            assert isinstance(self.shell, LeanShell)
            self.shell.capture.send(result)
        self._is_active = False


class _DisplayPublisher(DisplayPublisher):
    """``display()``, figures and ``clear_output()`` as outputs."""

    def publish(
        self,
        data: dict[str, Any],
        metadata: Any = None,
        source: Any = None,
        *,
        transient: Any = None,
        update: bool = False,
        **kwargs: Any,
    ) -> None:
        self.shell.capture.send({"type": "update_display_data" if update else "display_data", "data": data})

    def clear_output(self, wait: bool = False) -> None:
        self.shell.capture.send({"type": "clear_output", "wait": bool(wait)})


class LeanShell(InteractiveShell):
    """The shell of the interpreter process."""

    displayhook_class = Type(_DisplayHook)
    display_pub_class = Type(_DisplayPublisher)
    # IPython's input transformations, skipped for a cell they would not change (cells.py).
    input_transformer_manager = Instance(CellTransformer, ())
    # As in ipykernel: no terminal, so no readline and no auto-indent.
    readline_use = CBool(False)
    autoindent = CBool(False)
    # Where outputs go; set by build() before any cell runs.
    capture: Capture
    # pandas takes a shell without this attribute for a terminal, and then formats frames to the
    # terminal's width instead of a notebook's 20 columns (``display.max_columns``). There is no
    # kernel object to offer: code that uses one gets None and fails as it would without.
    kernel = None

    def init_environment(self) -> None:
        # ipykernel's: colour for tools that look at the terminal, and no pagers (nothing could page).
        os.environ.update(TERM="xterm-color", CLICOLOR="1", FORCE_COLOR="1", CLICOLOR_FORCE="1")
        os.environ.update(PAGER="cat", GIT_PAGER="cat")
        # Plotly picks its renderer by the shell's class name; this is the one it picks under ipykernel.
        os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")

    def init_hooks(self) -> None:
        super().init_hooks()  # type: ignore[no-untyped-call]
        # ipykernel sends pager text (``obj?``) as a payload that TCI never returned: drop it the same way.
        self.set_hook("show_in_pager", page.as_hook(_drop_page), 99)  # type: ignore[no-untyped-call]

    def enable_gui(self, gui: str | None = None) -> None:
        if gui not in (None, "inline"):
            # Said, not raised: ``%gui`` reports an error through ``logging.error``, which would configure
            # the root logger for the rest of the session (and so make a later ``logging.basicConfig`` a no-op).
            sys.stderr.write(f"GUI event loop {gui!r} is not available: the sandbox has no display\n")

    # Set by ``exit(keep_kernel=...)``, ipykernel's exiter.
    keepkernel_on_exit = False

    @default("exiter")
    def _exiter_default(self) -> ZMQExitAutocall:
        return ZMQExitAutocall(self)  # type: ignore[no-untyped-call]

    def ask_exit(self) -> None:
        """``exit()`` / ``quit()``: the interpreter ends after this cell (the runner starts a new one), unless
        ``exit(keep_kernel=True)``, which goes on, as in ipykernel."""
        self.exit_now = not self.keepkernel_on_exit

    def should_run_async(
        self, raw_cell: str, *, transformed_cell: str | None = None, preprocessing_exc_tuple: Any = None
    ) -> bool:
        # Only an `await`, `async for` or `async with` makes a cell a coroutine; IPython finds out by
        # compiling the whole cell once more, which a cell without either word is spared.
        cell = transformed_cell if transformed_cell is not None else raw_cell
        if cell.isascii() and "await" not in cell and "async" not in cell:
            return False
        return bool(
            super().should_run_async(
                raw_cell, transformed_cell=transformed_cell, preprocessing_exc_tuple=preprocessing_exc_tuple
            )
        )

    # Whether the running cell's error has been sent; interpreter.py sends one IPython could not.
    error_sent = False

    @contextlib.contextmanager
    def _tee(self, channel: str) -> Iterator[None]:
        # IPython copies every write of a cell into its history's record of outputs (for ``%notebook``
        # only): tens of megabytes a cell for a chatty loop, and never let go. Nothing is copied here.
        yield

    def forget_cell_record(self) -> None:
        """Drop what IPython recorded of the cell besides its input: its results and the text of its error.

        IPython keeps them, for ``%notebook`` only, for the life of the session; a long session that
        shows frames or fails often would carry them all. ``In``, ``Out`` and ``_i``/``_`` are kept.
        """
        # db_input_cache is written out only to a history database, which is off. Looked up softly: an
        # IPython without one of them (a user may install another) must not fail every cell here.
        for name in ("outputs", "exceptions", "db_input_cache"):
            record = getattr(self.history_manager, name, None)
            if record is not None:
                record.clear()

    def showtraceback(
        self,
        exc_tuple: Any = None,
        filename: str | None = None,
        tb_offset: int | None = None,
        exception_only: bool = False,
        running_compiled_code: bool = False,
    ) -> None:
        # IPython cannot format exception groups and prints Python's traceback to stderr instead, which
        # made the cell's error a second time (interpreter.py sends any error IPython did not): the
        # same text goes out once, as the error output.
        try:
            etype, value, tb = self._get_exc_info(exc_tuple)  # type: ignore[no-untyped-call]
        except ValueError:
            etype = value = tb = None
        if not exception_only and _holds_group(value) and etype is not None and not issubclass(etype, SyntaxError):
            stb = "".join(traceback.format_exception(etype, value, tb)).rstrip("\n").split("\n")
            self._showtraceback(etype, value, stb)
            return
        super().showtraceback(exc_tuple, filename, tb_offset, exception_only, running_compiled_code)

    def _showtraceback(self, etype: type[BaseException], evalue: BaseException, stb: list[str]) -> None:
        self.send_error(etype.__name__, str(evalue), stb)
        self._last_traceback = stb

    def send_error(self, ename: str, evalue: str, stb: list[str]) -> None:
        """Send the running cell's ``error`` output."""
        self.capture.send({"type": "error", "ename": ename, "evalue": evalue, "traceback": stb})
        self.error_sent = True

    def system_piped(self, cmd: str) -> None:
        """``!cmd``: a shell whose output goes straight into the captured descriptors.

        The command is over when the shell exits, even if what it put in the background (``!server &``)
        still writes: that goes on into the pipes, and the runner stops it when the execute ends.
        """
        # depth=1: names in the cell's frame (a function's locals) expand as in ipykernel's own method.
        expanded = self.var_expand(cmd, depth=1)  # type: ignore[no-untyped-call]
        # A cell that redirected a stream (%%capture, contextlib.redirect_stdout) gets the command's
        # output there, as from ipykernel, which reads it and writes it to sys.stdout.
        redirected = {
            name: stream
            for name, stream in (("stdout", sys.stdout), ("stderr", sys.stderr))
            # None (a cell's ``sys.stdout = None``): the descriptors, as before it
            if stream is not None and stream is not self.capture.streams[name]
        }
        exit_code = run_shell(expanded, redirected)
        # Its output waits in the pipes: read it now, or a print after it in the other stream (its
        # exit code, say) could be sent first when the output thread is slow to run.
        self.capture.after_child()
        self.user_ns["_exit_code"] = exit_code
        if getattr(self, "system_raise_on_error", False) and exit_code != 0:
            raise subprocess.CalledProcessError(exit_code, cmd)

    system = system_piped


def build(capture: Capture) -> LeanShell:
    """The shell, configured as ipykernel configures its own, sending its outputs to ``capture``."""
    config = Config()
    config.HistoryManager.enabled = False
    config.Completer.use_jedi = False
    config.InteractiveShell.colors = "nocolor"
    # Cells are named by ipykernel's compiler; finding the temporary directory it names them after
    # writes a probe file there, so an interpreter restarted while /tmp is full could run no cell.
    with contextlib.suppress(FileNotFoundError):
        tempfile.gettempdir()
    tempfile.tempdir = tempfile.tempdir or "/tmp"
    transformer = CellTransformer()
    compiler = reusing_parses(_jupyter_compiler() or CachingCompiler, transformer)
    shell = LeanShell.instance(config=config, compiler_class=compiler, input_transformer_manager=transformer)
    transformer.shell = shell
    shell.capture = capture
    builtins.input = _no_input
    getpass.getpass = _no_getpass
    sys.breakpointhook = _no_breakpoint
    _track_children(shell)
    return shell


def _jupyter_compiler() -> type | None:
    """ipykernel's cell compiler, loaded without the ipykernel package (whose import takes half a second).

    Cells compiled under Jupyter's names (``/tmp/ipykernel_<pid>/<hash>.py``) give the same tracebacks
    and warning locations as in a Jupyter kernel. None when ipykernel is not installed.
    """
    spec = importlib.util.find_spec("ipykernel")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).with_name("compiler.py")
    module_spec = importlib.util.spec_from_file_location("_tci_ipykernel_compiler", source)
    if module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - an ipykernel without it: IPython's own names
        return None
    compiler = getattr(module, "XCachingCompiler", None)
    original = getattr(module, "murmur2_x86", None)
    # The hash that names a cell's file, in pure Python over every byte of the cell: a faster one
    # where it gives the same names (0.18 -> 0.09 ms for a 2 KB cell).
    if callable(original) and all(murmur2_x86(probe, seed) == original(probe, seed) for probe, seed in _MURMUR_PROBES):
        module.murmur2_x86 = murmur2_x86  # type: ignore[attr-defined]
    return compiler if isinstance(compiler, type) else None


_MURMUR_PROBES: Final = [
    (text, seed) for text in ("", "a", "ab", "abc", "print(1)\n", "é€😀\n" * 7) for seed in (0, 0xC70F6907)
]


def murmur2_x86(data: str, seed: int) -> int:
    """ipykernel's ``murmur2_x86`` (32-bit MurmurHash2 of ``data`` as UTF-8), the same values, in half the time."""
    raw = data.encode("utf8")
    length = len(raw)
    m = 0x5BD1E995
    h = seed ^ length
    end = length & ~3
    for block in struct.unpack_from(f"<{end >> 2}I", raw):
        k = (block * m) & 0xFFFFFFFF
        k ^= k >> 24
        h = ((h * m) & 0xFFFFFFFF) ^ ((k * m) & 0xFFFFFFFF)
    tail = length & 3
    if tail:
        k = raw[end]
        if tail >= 2:
            k |= raw[end + 1] << 8
        if tail == 3:
            k |= raw[end + 2] << 16
        h = ((h ^ k) * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def run_shell(cmd: str, into: dict[str, IO[str]] | None = None) -> int:
    """Run ``cmd`` with ``/bin/sh`` in a session of its own; its exit status.

    ``into``: streams (``stdout``, ``stderr``) whose output is read and written to the given Python
    streams; the others write straight into the interpreter's descriptors.
    """
    into = into or {}
    proc = subprocess.Popen(  # noqa: S602 - a shell escape is a shell command by definition
        cmd,
        shell=True,
        executable="/bin/sh",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if "stdout" in into else None,
        stderr=subprocess.PIPE if "stderr" in into else None,
        start_new_session=True,
        # Lowered before exec (one system call, so safe beside the output thread): a quick command
        # would otherwise have run, or forked, before the Popen hook lowers it.
        preexec_fn=lower_priority,
    )
    try:
        if into:
            _relay(proc, into)
        return proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=_ESCAPE_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    except BaseException:
        # A redirected stream that failed to take the output: the command goes with the cell's error.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _relay(proc: subprocess.Popen[bytes], into: dict[str, IO[str]]) -> None:
    """Write what ``proc`` writes to its pipes to the streams of ``into`` until the shell has exited.

    What it left in the background may go on writing; once the shell is gone and the pipes are empty,
    the relay ends (as ``!cmd &`` returns when the shell exits) and ``run_shell`` closes them.
    """
    pipes = [(pipe, into[name]) for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)) if pipe]
    targets = {pipe.fileno(): (stream, utf8_decoder()) for pipe, stream in pipes}
    with selectors.DefaultSelector() as selector:
        for pipe, _ in pipes:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map():
            exited = proc.poll() is not None
            ready = selector.select(timeout=0 if exited else 0.1)
            for key, _ in ready:
                data = os.read(key.fd, 65536)
                if data:
                    stream, decoder = targets[key.fd]
                    stream.write(decoder.decode(data))
                else:
                    selector.unregister(key.fileobj)
            if exited and not ready:
                break
    for stream, decoder in targets.values():
        stream.write(decoder.decode(b"", final=True))


def _holds_group(error: BaseException | None) -> bool:
    """Whether ``error`` or an exception it was raised while handling is an exception group."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # a cell can make contexts point at each other
        if isinstance(error, BaseExceptionGroup):
            return True
        seen.add(id(error))
        error = error.__context__
    return False


def _no_breakpoint(*_: Any, **__: Any) -> None:
    """``breakpoint()``: nothing, as in a Jupyter kernel with no debugger attached (pdb would ask for input)."""


def lower_priority() -> None:
    """Run the calling process at ``CHILD_NICE``."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, CHILD_NICE)


def _drop_page(*_: Any, **__: Any) -> None:
    pass


def _no_input(prompt: object = "") -> str:
    __tracebackhide__ = True  # the caller's line is the one that matters
    raise StdinNotImplementedError("raw_input was called, but this frontend does not support input requests.")


def _no_getpass(prompt: str = "Password: ", stream: Any = None) -> str:
    __tracebackhide__ = True
    raise StdinNotImplementedError("getpass was called, but this frontend does not support input requests.")


# Process handles user code still holds: their exit status is theirs to collect.
_handles: weakref.WeakSet[Any] = weakref.WeakSet()


def _track_handles(cls: Any, before: Callable[[], None] | None = None) -> None:
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if before is not None:
            before()
        original(self, *args, **kwargs)
        _handles.add(self)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self.pid, CHILD_NICE)

    cls.__init__ = __init__


def _reap_children(*_: Any) -> None:
    """Collect children the runner killed after the previous execute (they are zombies until then).

    Every child of the interpreter is killed when its execute ends (the runner's leftover policy), so
    a zombie child left at the start of the next execute has no one else to wait for it, unless a
    ``subprocess.Popen`` or ``multiprocessing`` handle still owns it: those report ``-9`` themselves.
    """
    try:
        # One syscall in the common case: no child has exited, so there is nothing to collect.
        if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            return
    except ChildProcessError:
        return  # no children at all
    owned = {handle.pid for handle in list(_handles) if getattr(handle, "returncode", None) is None}
    me = os.getpid()
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return  # no file descriptor to spare: the runner restarts such an interpreter
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) in owned:
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
        if state == "Z" and int(ppid) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


def _calling_first(first: Callable[[], None], function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, calling ``first`` before each call."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        first()
        return function(*args, **kwargs)

    return call


def _track_children(shell: LeanShell) -> None:
    import multiprocessing.popen_fork

    # Every way user code starts a child first sends what was printed (sandbox_runner.capture): forks
    # (multiprocessing, pty, os.spawn*), Popen (which may not fork from Python) and the C-level spawns.
    before = shell.capture.before_child
    os.register_at_fork(before=before, after_in_child=lower_priority)
    for name in ("system", "posix_spawn", "posix_spawnp"):
        setattr(os, name, _calling_first(before, getattr(os, name)))
    _track_handles(subprocess.Popen, before)
    _track_handles(multiprocessing.popen_fork.Popen)  # it forks: the fork hook has sent them
    shell.events.register("pre_execute", _reap_children)
