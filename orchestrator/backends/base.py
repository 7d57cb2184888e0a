"""The backend protocol: where sandboxes run (Docker, Kubernetes; a local one for tests).

A backend starts, finds, connects to and removes sandboxes. It knows nothing about sessions
beyond the ``Claim`` it records on each sandbox; ``SessionManager`` owns session policy. Every
method may be called concurrently from the event loop and must never block it.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..models import Claim, SandboxInfo
from ..runner_client import RunnerClient


class Backend(Protocol):
    """What ``SessionManager``, the warm pool and the reaper need from a sandbox platform."""

    async def start(self) -> None:
        """Open clients. Called once by the app's lifespan before anything else."""

    async def close(self) -> None:
        """Release clients; sandboxes keep running (the next start re-adopts them)."""

    async def ping(self) -> None:
        """Check the platform answers. Called by ``/readyz``.

        Raises:
            BackendUnavailable: the platform cannot be reached.
        """

    async def image_present(self) -> bool:
        """Whether the sandbox image is available without pulling. Called by ``/readyz``."""

    async def create(self, claim: Claim | None) -> SandboxInfo:
        """Start a sandbox, claimed for a session now (cold start) or later (warm pool).

        Called by ``SessionManager`` and the pool. Returns once the sandbox runs; it is not yet
        connected. Guarantee: on failure nothing is left behind.

        Raises:
            SandboxImageMissing: the image is not there.
            BackendUnavailable: the platform failed.
            SandboxStartFailed: the sandbox did not start (it was removed again).
        """

    async def connect(self, sandbox: SandboxInfo, timeout: float) -> RunnerClient:
        """Open the runner channel of a running sandbox and say hello.

        Called after ``create`` and, after an orchestrator restart, for every adopted sandbox.
        Connecting again to the same sandbox is allowed: the previous channel stops being read.

        Raises:
            RunnerFailure: no runner answered within ``timeout``.
        """

    async def claim(self, sandbox: SandboxInfo, claim: Claim) -> SandboxInfo:
        """Record ``claim`` on an unclaimed sandbox (warm pool hand-out). Called by the pool.

        Of concurrent claims on one sandbox, from this process or another control plane, at most
        one succeeds (``tests/integration/test_backend_contract.py`` holds every backend to it).

        Raises:
            SandboxStartFailed: the sandbox is gone; the caller should fall back to a cold start.
        """

    async def list(self) -> list[SandboxInfo]:
        """This instance's sandboxes as the platform sees them now (never a cache).

        Called by reconcile at start-up and by every reaper run.

        Raises:
            BackendUnavailable: the platform failed; callers must then remove nothing.
        """

    async def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox and everything it holds. Idempotent: gone already is success.

        Raises:
            BackendUnavailable: the platform failed; the reaper will try again.
        """


async def first_request(
    backend: Backend, sandbox: SandboxInfo, timeout: float, op: str, args: dict[str, Any], reply_timeout: float
) -> tuple[RunnerClient, dict[str, Any]]:
    """Connect to ``sandbox``'s runner and send it ``op``; the channel and the reply.

    If the request fails or is cancelled, the channel is closed: nobody else holds it yet.
    """
    client = await backend.connect(sandbox, timeout)
    try:
        return client, await client.request(op, args, timeout=reply_timeout)
    except BaseException:
        await client.close()
        raise


async def ready_client(backend: Backend, sandbox: SandboxInfo, timeout: float) -> RunnerClient:
    """A channel to ``sandbox``'s runner once its kernel is ready (``timeout`` for each step)."""
    client, _ = await first_request(backend, sandbox, timeout, "ready", {"timeout": timeout}, timeout + 5)
    return client
