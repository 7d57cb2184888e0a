"""Runner configuration, read once from ``TCI_RUNNER_*`` environment variables at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Per-execute caps. Text caps count UTF-8 bytes; ``max_output_bytes`` also counts images."""

    max_stream_bytes: int = 1 * MiB
    max_output_bytes: int = 8 * MiB
    max_file_bytes: int = 16 * MiB
    max_files_bytes: int = 32 * MiB
    max_files: int = 64
    max_name_bytes: int = 255
    max_path_bytes: int = 1024

    @property
    def max_frame_bytes(self) -> int:
        """The interpreter's largest frame: a display within the output cap, JSON-escaped."""
        return 2 * self.max_output_bytes + MiB


@dataclass(frozen=True)
class RunnerConfig:
    """Everything the runner needs to know about its container."""

    workdir: Path = Path("/workspace")
    limits: Limits = field(default_factory=Limits)
    # Seconds to wait after SIGINT before the kernel is killed and restarted.
    interrupt_grace: float = 3.0
    # RSS cap for the kernel's process tree; 0 derives it from the cgroup limit minus a reserve.
    kernel_memory_bytes: int = 0
    memory_reserve_bytes: int = 96 * MiB
    # Where the image keeps a prebuilt matplotlib font cache to seed the writable config dir.
    mpl_seed_dir: Path = Path("/opt/mplconfig")
    # A Unix socket the orchestrator listens on; the runner dials it. None: serve on stdin/stdout.
    socket: Path | None = None
    # The index gate's socket, relayed to 127.0.0.1:index_port for pip. None: no package index.
    index_socket: Path | None = None
    index_port: int = 3141
    # Shared writable directories the ``run`` op restores to their previous listing after each run.
    scrub_dirs: tuple[Path, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunnerConfig:
        """Build the config from ``TCI_RUNNER_*`` variables, with the defaults above."""
        env = os.environ if env is None else env

        def num(name: str, default: float) -> float:
            raw = env.get(f"TCI_RUNNER_{name}")
            return float(raw) if raw else default

        base = Limits()
        limits = Limits(
            max_stream_bytes=int(num("MAX_STREAM_BYTES", base.max_stream_bytes)),
            max_output_bytes=int(num("MAX_OUTPUT_BYTES", base.max_output_bytes)),
            max_file_bytes=int(num("MAX_FILE_BYTES", base.max_file_bytes)),
            max_files_bytes=int(num("MAX_FILES_BYTES", base.max_files_bytes)),
            max_files=int(num("MAX_FILES", base.max_files)),
        )
        return cls(
            workdir=Path(env.get("TCI_RUNNER_WORKDIR", str(cls.workdir))),
            limits=limits,
            interrupt_grace=num("INTERRUPT_GRACE", cls.interrupt_grace),
            kernel_memory_bytes=int(num("KERNEL_MEMORY_BYTES", 0)),
            memory_reserve_bytes=int(num("MEMORY_RESERVE_BYTES", cls.memory_reserve_bytes)),
            mpl_seed_dir=Path(env.get("TCI_RUNNER_MPL_SEED_DIR", str(cls.mpl_seed_dir))),
            socket=Path(env["TCI_RUNNER_SOCKET"]) if env.get("TCI_RUNNER_SOCKET") else None,
            index_socket=Path(env["TCI_RUNNER_INDEX_SOCKET"]) if env.get("TCI_RUNNER_INDEX_SOCKET") else None,
            index_port=int(num("INDEX_PORT", cls.index_port)),
            scrub_dirs=tuple(Path(d) for d in env.get("TCI_RUNNER_SCRUB_DIRS", "").split(":") if d),
        )
