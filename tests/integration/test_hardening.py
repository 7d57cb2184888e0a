"""A session container runs with the full hardening set (read off `docker inspect`)."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from fastapi.testclient import TestClient

from orchestrator.app import create_app
from orchestrator.backends.docker_spec import CHANNEL_DIR

from .conftest import execute, our_containers, text_of

pytestmark = pytest.mark.docker


def test_session_container_is_hardened(api, docker_client, run_id, make_settings):
    execute(api, "x = 1")
    [container] = our_containers(docker_client, run_id)
    attrs = docker_client.api.inspect_container(container.id)
    host = attrs["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host.get("CapAdd")
    assert host["Privileged"] is False
    assert "no-new-privileges:true" in host["SecurityOpt"]
    seccomp = next(opt for opt in host["SecurityOpt"] if opt.startswith("seccomp="))
    shipped = json.loads(resources.files("orchestrator.backends").joinpath("seccomp.json").read_text())
    assert json.loads(seccomp.removeprefix("seccomp=")) == shipped
    assert host["NetworkMode"] == "none"
    assert host["Init"] is True
    assert host["PidsLimit"] == 256
    assert host["Memory"] > 0
    assert host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 1_000_000_000
    assert host["IpcMode"] == "private"
    assert set(host["Tmpfs"]) == {"/tmp", "/workspace", "/home/sandbox", "/opt/venv/local"}
    assert all("size=" in options for options in host["Tmpfs"].values())
    assert {u["Name"] for u in host["Ulimits"]} >= {"nofile", "fsize", "core"}
    assert host["LogConfig"]["Type"] == "none"
    assert host["RestartPolicy"]["Name"] == "no"
    assert attrs["Config"]["User"] == "10001:10001"
    # One bind mount: the session's own runner socket directory, read-only. Never the Docker socket.
    [mount] = [m for m in attrs["Mounts"] if m["Type"] == "bind"]
    assert mount["Type"] == "bind"
    assert mount["Destination"] == CHANNEL_DIR
    assert mount["RW"] is False
    assert mount["Source"].startswith(str(make_settings().socket_dir))
    assert "docker.sock" not in json.dumps(attrs["Mounts"])
    # Besides it, only the image's own library trees, from read-only volumes (backends/library.py).
    volumes = {m["Destination"]: m for m in attrs["Mounts"] if m["Type"] == "volume"}
    assert set(volumes) == {"/usr/lib/python3.11", "/opt/venv"}
    assert all(m["RW"] is False and m["Name"].startswith("tci-lib-") for m in volumes.values())
    assert len(attrs["Mounts"]) == 1 + len(volumes)
    assert attrs["Config"]["OpenStdin"] is False
    env_names = {entry.split("=", 1)[0] for entry in attrs["Config"]["Env"]}
    assert not {n for n in env_names if any(s in n.upper() for s in ("KEY", "TOKEN", "SECRET", "PASSWORD"))}


def test_seccomp_profile_denies_dangerous_calls():
    profile = json.loads(resources.files("orchestrator.backends").joinpath("seccomp.json").read_text())
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = {
        name
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and "args" not in rule
        for name in rule["names"]
    }
    for name in (
        "io_uring_setup",
        "io_uring_enter",
        "keyctl",
        "add_key",
        "bpf",
        "unshare",
        "mount",
        "setns",
        "ptrace",
        "userfaultfd",
        "perf_event_open",
        "kexec_load",
        "init_module",
        "process_vm_readv",
    ):
        assert name not in allowed, name


def test_sandbox_user_cannot_escalate(api):
    data = execute(
        api,
        "import os, subprocess\n"
        "print(os.getuid(), os.getgid())\n"
        "root = [line.split() for line in open('/proc/mounts') if line.split()[1] == '/'][0]\n"
        "print('rootfs', root[3].split(',')[0])\n"
        "r = subprocess.run(['unshare', '-U', 'true'], capture_output=True)\nprint('unshare', r.returncode)\n"
        "import socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
        "except OSError as e:\n    print('net', type(e).__name__)\n",
    )
    out = "".join(o["data"] for o in data["outputs"] if o["type"] == "stdout")
    assert out.startswith("10001 10001")
    assert "rootfs ro" in out
    assert "unshare 0" not in out
    assert "net " in out


LIMITS_PROBE = """
import ctypes, errno, os, resource
libc = ctypes.CDLL(None, use_errno=True)
def denied(number, *args):
    result = libc.syscall(number, *args)
    return errno.errorcode.get(ctypes.get_errno(), '?') if result == -1 else 'allowed'
# x86_64 numbers: unshare(CLONE_NEWUSER), mount, io_uring_setup
print('unshare', denied(272, 0x10000000))
print('mount', denied(165, b'none', b'/tmp', b'tmpfs', 0, None))
print('io_uring', denied(425, 1, ctypes.create_string_buffer(120)))
print('capeff', [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')][0])
print('nofile', resource.getrlimit(resource.RLIMIT_NOFILE)[0])
print('fsize', resource.getrlimit(resource.RLIMIT_FSIZE)[0])
try:
    with open('/tmp/big', 'wb', buffering=0) as f:
        while True:  # a write across the limit is cut short; the next one fails
            f.write(b'x' * 65536)
except OSError as e:
    print('big', errno.errorcode[e.errno])
os.remove('/tmp/big')
for d in ('/tmp', '/workspace', '/home/sandbox'):
    s = os.statvfs(d)
    print(d, s.f_blocks * s.f_frsize)
try:
    open('/run/tci-runner/forged', 'w')
except OSError as e:
    print('socket_dir', errno.errorcode[e.errno])
"""


def test_limits_hold_inside_a_running_sandbox(make_settings):
    mib = 1024 * 1024
    sandbox = {"max_file_size_bytes": mib, "nofile": 1000, "tmp_bytes": 16 * mib, "workspace_bytes": 32 * mib}
    with TestClient(create_app(make_settings(sandbox=sandbox))) as api:
        data = execute(api, LIMITS_PROBE)
    assert data["outcome"] == "ok", data
    seen = dict(line.split(" ", 1) for line in text_of(data, "stdout").splitlines())
    assert seen["unshare"] == "EPERM", seen
    assert seen["mount"] == "EPERM", seen
    assert seen["io_uring"] in {"EPERM", "ENOSYS"}, seen
    assert int(seen["capeff"], 16) == 0, seen
    assert seen["nofile"] == "1000"
    assert seen["fsize"] == str(mib)
    assert seen["big"] == "EFBIG", seen
    assert seen["/tmp"] == str(16 * mib)
    assert seen["/workspace"] == str(32 * mib)
    assert seen["/home/sandbox"] == str(256 * mib)
    assert seen["socket_dir"] in {"EROFS", "EACCES"}, seen
