"""How many repetitions each figure gets: the full benchmark, and ``--quick`` for a smoke run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    latency_blocks: int
    """Floor, runner and HTTP latencies are measured in interleaved blocks, so drift hits all three."""
    latency_block_size: int
    latency_warmup: int
    kernel_starts: int
    pool_hits: int
    cold_starts: int
    docker_runs: int
    peer_sessions: int
    peer_runs: int
    peer_interactive_sessions: int
    peer_interactive_runs: int
    throughput_levels: tuple[int, ...]
    throughput_seconds: float
    memory_levels: tuple[int, ...]
    burst_requests: int
    package_installs: int
    """Cold/cached install pairs, each on an empty package cache."""
    run_code_callers: int
    run_code_burst: int
    neighbour_samples: int
    storm_requests: int

    @property
    def latency_samples(self) -> int:
        return self.latency_blocks * self.latency_block_size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FULL = Plan(
    latency_blocks=8,
    latency_block_size=50,
    latency_warmup=30,
    kernel_starts=20,
    pool_hits=20,
    cold_starts=20,
    docker_runs=20,
    peer_sessions=20,
    peer_runs=50,
    peer_interactive_sessions=20,
    peer_interactive_runs=30,
    throughput_levels=(1, 4, 16, 64),
    throughput_seconds=10.0,
    memory_levels=(10, 100),
    burst_requests=100,
    package_installs=3,
    run_code_callers=16,
    run_code_burst=500,
    neighbour_samples=200,
    storm_requests=500,
)

QUICK = Plan(
    latency_blocks=2,
    latency_block_size=25,
    latency_warmup=10,
    kernel_starts=3,
    pool_hits=3,
    cold_starts=3,
    docker_runs=3,
    peer_sessions=2,
    peer_runs=5,
    peer_interactive_sessions=2,
    peer_interactive_runs=5,
    throughput_levels=(1, 4, 16),
    throughput_seconds=3.0,
    memory_levels=(10,),
    burst_requests=30,
    package_installs=1,
    run_code_callers=16,
    run_code_burst=60,
    neighbour_samples=40,
    storm_requests=100,
)
