"""The kernel process's entry point: ipykernel's own launcher, without its debugger.

TCI has no debug requests, and importing debugpy is about a sixth of a kernel's start-up. ipykernel
leaves its debugger out when debugpy cannot be imported, so the import is blocked while the kernel
is built; ``kernel_ext`` lifts the block once it loads, so user code can still import debugpy.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # As ipykernel_launcher: the working directory joins sys.path later, through IPython.
    if sys.path[0] == "" or Path(sys.path[0]) == Path.cwd():
        del sys.path[0]
    sys.modules["debugpy"] = None  # type: ignore[assignment]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()
