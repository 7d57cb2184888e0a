"""Pure translation of an interpreter's output frames into TCI outputs, with output caps.

The frames have the content shapes of Jupyter's iopub messages. One ``OutputCollector`` lives for
one execute. ``feed`` takes each frame of that execute in arrival order; ``finish`` returns the
outputs. Nothing here does I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

from .config import Limits

# CSI sequences (colours, cursor moves) and OSC sequences (titles, hyperlinks).
_ANSI: Final = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
STREAMS: Final = ("stdout", "stderr")
# What each output item counts against MAX_OUTPUT_BYTES besides its data: its envelope in the reply.
# Without it, stdout and stderr written in turn a byte at a time made a million items (40 MB of JSON
# that held the control plane's loop for seconds) while every byte cap still had room.
ITEM_BYTES: Final = 64


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences (IPython colours tracebacks)."""
    return _ANSI.sub("", text)


def utf8_len(text: str) -> int:
    """Size of ``text`` on the wire."""
    return len(text.encode("utf-8", errors="replace"))


def cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` that fits in ``max_bytes`` UTF-8 bytes."""
    return text.encode("utf-8", errors="replace")[:max_bytes].decode("utf-8", errors="ignore")


def bundle_size(data: dict[str, Any]) -> int:
    """Bytes a MIME bundle adds to a reply (base64 text for images)."""
    return sum(utf8_len(v) if isinstance(v, str) else utf8_len(json.dumps(v)) for v in data.values())


class OutputCollector:
    """Turns the iopub messages of one execute into TCI outputs, capped at the configured sizes."""

    def __init__(self, limits: Limits, on_output: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.outputs: list[dict[str, Any]] = []
        # Told of every piece of output as it is kept (after the caps), for streaming executes.
        self._on_output = on_output
        self.error_summary: str | None = None
        self.dropped: dict[str, int] = {"stdout": 0, "stderr": 0, "display": 0}
        self._limits = limits
        self._stream_bytes = dict.fromkeys(STREAMS, 0)
        self._total_bytes = 0
        self._marker_at: dict[str, int] = {}
        self._dropped_displays = 0
        self._clear_on_next = False

    def feed(self, msg_type: str, content: dict[str, Any]) -> None:
        """Take one iopub message (already filtered to this execute)."""
        match msg_type:
            case "stream":
                name = content.get("name")
                if name in STREAMS:
                    self._stream(name, str(content.get("text", "")))
            case "display_data" | "update_display_data":
                self._display("display_data", content.get("data"))
            case "execute_result":
                self._display("execute_result", content.get("data"))
            case "error":
                self._error(content)
            case "clear_output":
                if content.get("wait"):
                    self._clear_on_next = True
                else:
                    self._clear()
            case "display_dropped":
                # A display too large to send at all: the interpreter sent its size instead.
                size = content.get("bytes")
                self.dropped["display"] += size if type(size) is int and size > 0 else 0
                self._dropped_displays += 1
            case _:
                # status, execute_input, comm_* and unknown types carry no output.
                pass

    def add_error(self, text: str) -> None:
        """Append an error output produced by the runner itself (timeout, kernel death)."""
        self._append("error", text)
        self.error_summary = text.splitlines()[0] if text else text

    def drop_keyboard_interrupt(self) -> None:
        """Remove the KeyboardInterrupt traceback our own interrupt caused; a timeout error replaces it."""
        self.outputs = [o for o in self.outputs if not (o["type"] == "error" and "KeyboardInterrupt" in o["data"])]

    def finish(self) -> list[dict[str, Any]]:
        """The outputs, with a visible marker wherever a cap dropped bytes."""
        for name in STREAMS:
            dropped = self.dropped[name]
            if not dropped:
                continue
            marker = f"\n[{name} truncated: {dropped} bytes dropped]\n"
            index = self._marker_at.get(name)
            if index is not None and index < len(self.outputs) and self.outputs[index]["type"] == name:
                self.outputs[index]["data"] += marker
            else:
                self.outputs.append({"type": name, "data": marker.lstrip("\n")})
        if self._dropped_displays:
            self.outputs.append(
                {
                    "type": "stderr",
                    "data": f"[{self._dropped_displays} display outputs truncated: "
                    f"{self.dropped['display']} bytes dropped]\n",
                }
            )
        return self.outputs

    @property
    def truncated(self) -> bool:
        """Whether any cap dropped output."""
        return any(self.dropped.values())

    def _maybe_clear(self) -> None:
        if self._clear_on_next:
            self._clear_on_next = False
            self._clear()

    def _clear(self) -> None:
        self.outputs = []
        self._marker_at = {}

    def _append(self, kind: str, data: Any) -> None:
        if self._on_output is not None:
            self._on_output({"type": kind, "data": data})
        last = self.outputs[-1] if self.outputs else None
        if kind in STREAMS and last is not None and last["type"] == kind:
            last["data"] += data
        else:
            self.outputs.append({"type": kind, "data": data})

    def _stream(self, name: str, text: str) -> None:
        self._maybe_clear()
        size = utf8_len(text)
        # A piece that does not continue the last item starts a new one, which costs its envelope.
        envelope = 0 if self.outputs and self.outputs[-1]["type"] == name else ITEM_BYTES
        room = min(
            self._limits.max_stream_bytes - self._stream_bytes[name],
            self._limits.max_output_bytes - self._total_bytes - envelope,
        )
        if self.dropped[name]:
            room = 0  # once something was dropped nothing more is kept: the output stays a prefix
        if size > room:
            kept = cut_utf8(text, max(room, 0))
            self.dropped[name] += size - utf8_len(kept)
            size = utf8_len(kept)
            text = kept
            if text:
                self._append(name, text)
            self._marker_at.setdefault(name, self._last_index_of(name))
        elif text:
            self._append(name, text)
        self._stream_bytes[name] += size
        self._total_bytes += size + (envelope if text else 0)

    def _display(self, kind: str, data: Any) -> None:
        if not isinstance(data, dict):
            return
        self._maybe_clear()
        size = bundle_size(data)
        if self._total_bytes + size + ITEM_BYTES > self._limits.max_output_bytes:
            self.dropped["display"] += size
            self._dropped_displays += 1
            return
        self._total_bytes += size + ITEM_BYTES
        self._append(kind, dict(data))

    def add_source_drops(self, report: Any) -> None:
        """Count what the interpreter dropped at the source (``{"stdout"|"stderr": bytes}``)."""
        if not isinstance(report, dict):
            return
        for name in STREAMS:
            count = report.get(name)
            if isinstance(count, int) and count > 0:
                self.dropped[name] += count
                self._marker_at.setdefault(name, self._last_index_of(name))

    def _last_index_of(self, name: str) -> int:
        for index in range(len(self.outputs) - 1, -1, -1):
            if self.outputs[index]["type"] == name:
                return index
        return len(self.outputs)

    def _error(self, content: dict[str, Any]) -> None:
        self._maybe_clear()
        ename = str(content.get("ename", "Error"))
        evalue = str(content.get("evalue", ""))
        traceback = content.get("traceback") or []
        text = strip_ansi("\n".join(str(line) for line in traceback)) if traceback else ""
        if not text.strip():
            text = f"{ename}: {evalue}"
        self._total_bytes += utf8_len(text) + ITEM_BYTES
        if self._on_output is not None:
            self._on_output({"type": "error", "data": text})
        self.outputs.append({"type": "error", "data": text})
        self.error_summary = f"{ename}: {evalue}" if evalue else ename
