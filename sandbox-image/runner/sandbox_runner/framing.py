"""The frame format both ends of the runner's channels share: standard library only.

A frame is a 4-byte big-endian length, then that many bytes. The interpreter imports this and
nothing else of the protocol, so that its start-up never imports asyncio (and, through it, ssl and
OpenSSL's libraries): IPython itself needs neither until a cell does.
"""

from __future__ import annotations

import struct
from typing import Final

HEADER: Final = struct.Struct(">I")
# Between the interpreter and the runner only: a length with this bit set is a stream frame, whose
# body is one byte naming the stream and then its text as UTF-8 (no JSON: megabytes of output would
# cost more to escape and parse than to produce).
STREAM_BIT: Final = 0x80000000
STREAM_IDS: Final = {"stdout": 1, "stderr": 2}


def stream_frame(name: str, data: bytes) -> bytes:
    """A stream frame: ``data`` (UTF-8 text) written to the stream ``name``."""
    return HEADER.pack(STREAM_BIT | (len(data) + 1)) + bytes((STREAM_IDS[name],)) + data
