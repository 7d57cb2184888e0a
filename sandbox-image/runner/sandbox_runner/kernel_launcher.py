"""The kernel process's entry point: ipykernel's own launcher, without its debugger.

TCI has no debug requests, and importing debugpy is about a sixth of a kernel's start-up. ipykernel
leaves its debugger out when debugpy cannot be imported, so the import is blocked while the kernel
is built; ``kernel_ext`` lifts the block once it loads, so user code can still import debugpy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The runner stays at the default priority, so that however busy user code keeps the CPU, the runner
# still gets its turn to stop it; the kernel's own children go lower still (see kernel_ext).
KERNEL_NICE = 10

if __name__ == "__main__":
    os.nice(KERNEL_NICE)  # before any thread exists: niceness is per thread, and threads inherit it
    # As ipykernel_launcher: the working directory joins sys.path later, through IPython.
    if sys.path[0] == "" or Path(sys.path[0]) == Path.cwd():
        del sys.path[0]
    sys.modules["debugpy"] = None  # type: ignore[assignment]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()
