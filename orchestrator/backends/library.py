"""Library volumes: the sandbox image's Python served from engine volumes, not its root filesystem.

A session starts two Python processes that import some 450 modules from the image. Where the
engine's storage driver runs in userspace (fuse-overlayfs), each of their ~1 000 path lookups and
every page they read is a round trip to that container's own storage daemon, and no container
shares another's page cache. A named volume is a plain directory on the engine's host: the same
lookups stay in the kernel, and its pages are cached once for every session. Measured on such a
host (interleaved starts): ``docker start`` to interpreter ready 1.17 s from the image alone,
0.92 s with the standard library from a volume, 0.80 s with the virtualenv's too.

The image names those trees in its label ``tci.sandbox.library-paths`` (absolute paths joined by
``:``). Per image id there is one volume per tree, filled once by the engine itself: it copies an
image's content into an empty named volume when a container that mounts it is created, so the
filler is a container that is created and removed, never started. Every sandbox made from that
image mounts them read-only. A third, empty volume marks the set complete; it is created once a
fill has succeeded and the volumes list exactly what the image's trees hold (``compare``). Until it
exists sandboxes are made from the image alone, so a fill never delays a session. A new image id
gets new volumes; those of images the engine no longer has are removed when nothing uses them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import docker
import docker.errors

from . import labels

PATHS_LABEL: Final = "tci.sandbox.library-paths"
LIBRARY: Final = f"{labels.NAMESPACE}.library"
"""Label on the volumes (and the filler): the image id they were filled from."""
_PREFIX: Final = "tci-lib"
# Copies into a set that came out unlike the image before the fill gives up (sessions then use the image).
_FILL_ATTEMPTS: Final = 3
STALE_LOCK_SECONDS: Final = 900.0
"""No fill takes this long (1.6 GB took 30-60 s here): an older lock is a dead filler's."""


@dataclass(frozen=True)
class Library:
    """The volume set of one image: names and where each is mounted."""

    image_id: str
    paths: tuple[str, ...]

    @property
    def _tag(self) -> str:
        return f"{_PREFIX}-{self.image_id.removeprefix('sha256:')[:16]}"

    @property
    def volumes(self) -> tuple[str, ...]:
        return tuple(f"{self._tag}-{index}" for index in range(len(self.paths)))

    @property
    def names(self) -> tuple[str, ...]:
        """Every volume of the set, the marker first."""
        return (self.marker, *self.volumes)

    @property
    def marker(self) -> str:
        """The empty volume whose existence says the set is complete."""
        return f"{self._tag}-complete"

    @property
    def filler(self) -> str:
        """The filler container's name: only one control plane fills a set at a time."""
        return f"{self._tag}-fill"

    def mounts(self, mode: str = "ro") -> dict[str, dict[str, str]]:
        """The ``volumes`` argument of ``containers.create`` for these trees."""
        return {volume: {"bind": path, "mode": mode} for volume, path in zip(self.volumes, self.paths, strict=True)}


def plan(image: dict[str, Any]) -> Library | None:
    """The volume set for an image (``docker inspect``'s attributes), or None if it names no trees."""
    image_labels = (image.get("Config") or {}).get("Labels") or {}
    paths = tuple(path for path in image_labels.get(PATHS_LABEL, "").split(":") if path)
    if not paths or any(not path.startswith("/") or ".." in path.split("/") for path in paths):
        return None
    return Library(image_id=image["Id"], paths=paths)


def _exists(client: docker.DockerClient, volume: str) -> bool:
    try:
        client.volumes.get(volume)
    except docker.errors.NotFound:
        return False
    return True


def complete(client: docker.DockerClient, library: Library) -> bool:
    """Whether the set is filled and all there (a volume removed by hand makes it incomplete)."""
    return all(_exists(client, volume) for volume in library.names)


def fill(client: docker.DockerClient, library: Library, *, wait_seconds: float) -> None:
    """Make the set complete; returns at once if it is. Blocking: run it in a worker thread.

    The filler's container name is a lock: a control plane that finds another filling the same set
    waits for it (up to ``wait_seconds``) and fills the set itself if that one gave up, or died
    holding the lock (``STALE_LOCK_SECONDS``).
    """
    deadline = time.monotonic() + wait_seconds
    owner = {LIBRARY: library.image_id}
    attempts = 0
    while not complete(client, library):
        try:
            lock = client.containers.create(library.image_id, name=library.filler, labels=owner, network_mode="none")
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            if _lock_age(client, library) > STALE_LOCK_SECONDS:
                # Its holder died before letting go (no fill takes this long): take the lock over.
                with contextlib.suppress(docker.errors.NotFound):
                    client.api.remove_container(library.filler, force=True)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"library volumes {library.marker} not filled within {wait_seconds:.0f} s") from exc
            time.sleep(0.5)  # a worker thread, never the event loop
            continue
        try:
            # A fill that died half-way left volumes the engine would not copy into again.
            for volume in library.names:
                with contextlib.suppress(docker.errors.NotFound):
                    client.volumes.get(volume).remove()
            for volume in library.volumes:
                client.volumes.create(volume, labels=owner)
            # The engine copies the image's trees into the empty volumes while it creates this one.
            client.containers.create(
                library.image_id, labels=owner, volumes=library.mounts("rw"), network_mode="none"
            ).remove(force=True)
            if (difference := compare(client, library)) is not None:
                attempts += 1
                if attempts >= _FILL_ATTEMPTS:
                    raise RuntimeError(f"library volumes {library.marker} differ from the image: {difference}")
                continue  # the next round removes them and copies again
            client.volumes.create(library.marker, labels=owner)
        finally:
            lock.remove(force=True)


def _listing(client: docker.DockerClient, library: Library, *, mounted: bool) -> set[bytes]:
    """Every entry of the image's trees (files with their sizes), from the image or from the volumes."""
    found: bytes = client.containers.run(
        library.image_id,
        entrypoint=["find", *library.paths, "(", "-type", "f", "-printf", "%p %s\\n", ")", "-o", "-printf", "%p\\n"],
        volumes=library.mounts() if mounted else None,
        network_mode="none",
        remove=True,
        labels={LIBRARY: library.image_id},
    )
    return set(found.splitlines())


def compare(client: docker.DockerClient, library: Library) -> str | None:
    """None if the volumes hold exactly the image's trees, else what differs.

    The engine's copy reads the image through its storage driver, which on a userspace overlay
    (fuse-overlayfs) has once left a whole directory out of a copy without an error: every session
    would then miss that package, where the image alone has it.
    """
    in_volumes, in_image = _listing(client, library, mounted=True), _listing(client, library, mounted=False)
    if in_volumes == in_image:
        return None
    absent, extra = sorted(in_image - in_volumes), sorted(in_volumes - in_image)
    return f"{len(absent)} entries missing (e.g. {absent[:3]}), {len(extra)} not in the image (e.g. {extra[:3]})"


def _lock_age(client: docker.DockerClient, library: Library) -> float:
    """Seconds since the filler's lock was taken; 0 if it is gone already."""
    try:
        created = client.api.inspect_container(library.filler)["Created"]
    except docker.errors.NotFound:
        return 0.0
    # The engine writes nanoseconds ("2026-11-30T12:00:00.123456789Z"); seconds are enough here.
    taken = datetime.strptime(created[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return (datetime.now(UTC) - taken).total_seconds()


def sweep(client: docker.DockerClient) -> list[str]:
    """Remove library volumes of images the engine no longer has (those in use stay); returns names removed."""
    removed = []
    for volume in client.volumes.list(filters={"label": LIBRARY}):
        image_id = (volume.attrs.get("Labels") or {}).get(LIBRARY, "")
        try:
            client.images.get(image_id)
            continue
        except docker.errors.ImageNotFound:
            pass
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            volume.remove()
            removed.append(volume.name)
    return removed


def prepare(client: docker.DockerClient, image: str, *, wait_seconds: float = 900.0) -> Library | None:
    """Fill the set of ``image`` now (blocking), so that every sandbox made after mounts it.

    The orchestrator fills a missing set in the background by itself; the test suite and the
    benchmark call this first, so that all their sandboxes are alike.
    """
    wanted = plan(client.images.get(image).attrs)
    if wanted is not None:
        fill(client, wanted, wait_seconds=wait_seconds)
    return wanted


def main() -> None:
    """``python -m orchestrator.backends.library [IMAGE]``: fill the image's library volumes."""
    import sys

    import structlog

    from ..logging import configure_logging
    from ..settings import SandboxSettings

    configure_logging("console", "INFO")
    log = structlog.get_logger(__name__)
    image = sys.argv[1] if len(sys.argv) > 1 else SandboxSettings().image
    began = time.monotonic()
    log.info("library_fill", image=image, note="a minute the first time, at once after")
    wanted = prepare(docker.from_env(), image)
    if wanted is None:
        log.info("library_none", image=image, reason=f"the image has no {PATHS_LABEL} label")
    else:
        log.info("library_ready", volumes=wanted.volumes, seconds=round(time.monotonic() - began, 1))


if __name__ == "__main__":
    main()
