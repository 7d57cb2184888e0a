from pathlib import Path

import pytest

from orchestrator.backends import library
from orchestrator.backends.docker_spec import CHANNEL_DIR, container_config
from orchestrator.settings import SandboxSettings

IMAGE_ID = "sha256:0123456789abcdef0123456789abcdef"


def image(paths: str | None) -> dict[str, object]:
    labels = {} if paths is None else {library.PATHS_LABEL: paths}
    return {"Id": IMAGE_ID, "Config": {"Labels": labels}}


def test_plan_reads_the_trees_the_image_names():
    wanted = library.plan(image("/usr/lib/python3.11:/opt/venv"))
    assert wanted is not None
    assert wanted.paths == ("/usr/lib/python3.11", "/opt/venv")
    assert wanted.volumes == ("tci-lib-0123456789abcdef-0", "tci-lib-0123456789abcdef-1")
    assert wanted.marker == "tci-lib-0123456789abcdef-complete"
    assert wanted.mounts() == {
        "tci-lib-0123456789abcdef-0": {"bind": "/usr/lib/python3.11", "mode": "ro"},
        "tci-lib-0123456789abcdef-1": {"bind": "/opt/venv", "mode": "ro"},
    }


@pytest.mark.parametrize("paths", [None, "", "relative/dir", "/opt/../etc", "/opt/venv:lib"])
def test_plan_refuses_no_or_unsafe_trees(paths):
    assert library.plan(image(paths)) is None
    assert library.plan({"Id": IMAGE_ID, "Config": None}) is None


def test_a_new_image_gets_new_volumes():
    other = library.plan(
        {"Id": "sha256:fedcba9876543210ffff", "Config": {"Labels": {library.PATHS_LABEL: "/opt/venv"}}}
    )
    assert other is not None
    assert set(other.volumes).isdisjoint(library.plan(image("/opt/venv")).volumes)  # type: ignore[union-attr]


def test_sandbox_mounts_library_read_only_beside_its_channel():
    mounts = library.plan(image("/opt/venv")).mounts()  # type: ignore[union-attr]
    config = container_config(
        SandboxSettings(), name="n", labels={}, seccomp_profile="{}", channel_dir=Path("/run/x"), library=mounts
    )
    assert config["volumes"] == {
        "tci-lib-0123456789abcdef-0": {"bind": "/opt/venv", "mode": "ro"},
        "/run/x": {"bind": CHANNEL_DIR, "mode": "ro"},
    }
    assert config["read_only"] is True
