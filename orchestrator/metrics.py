"""Prometheus metrics, on a registry owned by one app (never the process-global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every metric the orchestrator exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("tci_sessions_active", "Live sessions.", registry=r)
        self.pool_ready = Gauge("tci_pool_ready", "Warm sandboxes ready to be claimed.", registry=r)
        self.pool_claims = Counter("tci_pool_claims_total", "New sessions by pool hit or miss.", ["result"], registry=r)
        self.pool_fill_seconds = Histogram("tci_pool_fill_seconds", "Time to make one warm sandbox.", registry=r)
        self.session_create_seconds = Histogram(
            "tci_session_create_seconds", "Time to provide a new session.", ["source"], registry=r
        )
        self.executions = Counter("tci_executions_total", "Executes by outcome.", ["outcome"], registry=r)
        self.execute_seconds = Histogram(
            "tci_execute_seconds",
            "Execute latency inside the orchestrator.",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.admission_rejected = Counter(
            "tci_admission_rejected_total", "Requests refused with 429.", ["reason"], registry=r
        )
        self.removed = Counter("tci_sandboxes_removed_total", "Sandboxes removed, by reason.", ["reason"], registry=r)
        self.reaper_runs = Counter("tci_reaper_runs_total", "Reaper passes.", ["result"], registry=r)
