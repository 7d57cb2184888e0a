import json
from pathlib import Path

from orchestrator.backends.docker_spec import CHANNEL_DIR, container_config
from orchestrator.settings import SandboxSettings


def build(channel_dir=None, **overrides):
    return container_config(
        SandboxSettings(**overrides), name="n", labels={"a": "b"}, seccomp_profile='{"x": 1}', channel_dir=channel_dir
    )


def test_hardened_by_default():
    config = build()
    assert config["network_mode"] == "none"
    assert config["cap_drop"] == ["ALL"]
    assert config["security_opt"] == ["no-new-privileges:true", 'seccomp={"x": 1}']
    assert config["read_only"] is True
    assert config["init"] is True
    assert config["user"] == "10001:10001"
    assert config["mem_limit"] == config["memswap_limit"]
    assert config["pids_limit"] == 256
    assert config["nano_cpus"] == 1_000_000_000
    assert config["restart_policy"] == {"Name": "no"}
    assert config["stdin_open"] is True
    assert config["tty"] is False
    assert "volumes" not in config
    assert "privileged" not in config
    assert all("size=" in options for options in config["tmpfs"].values())
    assert {u["Name"] for u in config["ulimits"]} == {"nofile", "fsize", "core"}
    assert not any("KEY" in k or "TOKEN" in k or "SECRET" in k for k in config["environment"])


def test_socket_channel_mounts_only_its_directory_read_only():
    config = build(channel_dir=Path("/run/x/abc"))
    assert config["volumes"] == {"/run/x/abc": {"bind": CHANNEL_DIR, "mode": "ro"}}
    assert config["environment"]["TCI_RUNNER_SOCKET"] == f"{CHANNEL_DIR}/runner.sock"
    assert config["stdin_open"] is False
    assert "TCI_RUNNER_SOCKET" not in build()["environment"]


def test_limits_and_runtime_are_configurable():
    config = build(memory_bytes=512 << 20, cpus=0.5, pids=64, runtime="runsc", network="bridge")
    assert config["mem_limit"] == 512 << 20
    assert config["nano_cpus"] == 500_000_000
    assert config["pids_limit"] == 64
    assert config["runtime"] == "runsc"
    assert config["network_mode"] == "bridge"
    assert "runtime" not in build()


def test_output_caps_reach_the_runner():
    env = build(max_stream_bytes=4096, max_output_bytes=8192)["environment"]
    assert env["TCI_RUNNER_MAX_STREAM_BYTES"] == "4096"
    assert env["TCI_RUNNER_MAX_OUTPUT_BYTES"] == "8192"


def test_log_driver_is_bounded():
    assert build()["log_config"] == {"Type": "none", "Config": {}}
    assert build(log_driver="json-file")["log_config"]["Config"] == {"max-size": "1m", "max-file": "1"}
    # The engine refuses "local" with one file unless compression is off.
    assert build(log_driver="local")["log_config"]["Config"] == {"max-size": "1m", "max-file": "1", "compress": "false"}
    assert build(log_driver="journald")["log_config"] == {"Type": "journald", "Config": {}}


def test_profile_key_changes_with_limits():
    assert SandboxSettings().profile_key() == SandboxSettings().profile_key()
    assert SandboxSettings().profile_key() != SandboxSettings(memory_bytes=2 << 30).profile_key()
    json.dumps(build())  # the whole config is plain data
