"""Labels and names that make the engine the source of truth about sandboxes.

Labels are fixed when a container is created: they say that we manage it, for which instance
and profile, and when it was created. A container's *name* is the one thing the orchestrator can
change afterwards, so a session's claim (id, tenant, start, expiry) is written into the name
when a warm container is claimed, or at creation for a cold start. Both survive a restart of the
orchestrator; neither can be changed from inside the container.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from ..models import Claim

NAMESPACE: Final = "io.tci-orchestrator"
MANAGED: Final = f"{NAMESPACE}.managed"
INSTANCE: Final = f"{NAMESPACE}.instance"
PROFILE: Final = f"{NAMESPACE}.profile"
CREATED: Final = f"{NAMESPACE}.created"
TEST_RUN: Final = f"{NAMESPACE}.test-run"
CHANNEL: Final = f"{NAMESPACE}.channel"

_PREFIX: Final = "tci"
_POOL: Final = re.compile(r"^tci\.[A-Za-z0-9_-]+\.pool\.[0-9a-f]+$")
_CLAIMED: Final = re.compile(
    r"^tci\.(?P<instance>[A-Za-z0-9_-]+)\.(?P<session>ses_[A-Za-z0-9]+)\.(?P<tenant>[A-Za-z0-9_-]+)"
    r"\.(?P<started>\d+)\.(?P<expires>\d+)(?P<unlisted>\.held)?$"
)


def make_labels(
    instance: str, profile: str, created_at: float, test_run: str | None = None, channel: str | None = None
) -> dict[str, str]:
    """Labels for a new sandbox container; ``channel`` is the key of its runner socket, if any."""
    labels = {MANAGED: "true", INSTANCE: instance, PROFILE: profile, CREATED: str(int(created_at))}
    if test_run:
        labels[TEST_RUN] = test_run
    if channel:
        labels[CHANNEL] = channel
    return labels


def selector(instance: str) -> list[str]:
    """Engine label filters that match this instance's sandboxes and nothing else."""
    return [f"{MANAGED}=true", f"{INSTANCE}={instance}"]


def pool_name(instance: str) -> str:
    """Name of an unclaimed (warm) sandbox."""
    return f"{_PREFIX}.{instance}.pool.{secrets.token_hex(8)}"


def is_pool_name(name: str) -> bool:
    """Whether ``name`` is a warm sandbox's own (not one a claim was renaming when it was interrupted)."""
    return _POOL.match(name.lstrip("/")) is not None


def claimed_name(instance: str, claim: Claim) -> str:
    """Name that records ``claim`` on the engine (times in whole milliseconds)."""
    return (
        f"{_PREFIX}.{instance}.{claim.session_id}.{claim.tenant}"
        f".{int(claim.started_at * 1000)}.{int(claim.expires_at * 1000)}" + ("" if claim.listed else ".held")
    )


def parse_claim(name: str) -> Claim | None:
    """The claim recorded in a container name, or None for an unclaimed sandbox."""
    match = _CLAIMED.match(name.lstrip("/"))
    if match is None:
        return None
    return Claim(
        session_id=match["session"],
        tenant=match["tenant"],
        started_at=int(match["started"]) / 1000,
        expires_at=int(match["expires"]) / 1000,
        listed=match["unlisted"] is None,
    )
