"""A test-only Kubernetes API server and kubelet, speaking the real HTTP API on loopback.

No kube-apiserver, kubelet or registry can run here, so this is the honest stand-in: an aiohttp
server that keeps pods with resourceVersions, lists them by label and field selector with
pagination, streams watches, applies merge patches with the resourceVersion precondition
(409 Conflict), deletes with a grace period, rejects pods that fail the Kubernetes schema
(kubernetes-validate, strict), and serves ``pods/attach`` over the websocket channel protocol
(v4 and v5). Its "kubelet" runs each pod's runner as a local process with the pod's environment,
as the local backend does, and reports container states as a kubelet would. The backend under
test reaches all of it through kubernetes_asyncio's own HTTP, watch and websocket code.

It runs in a thread with its own event loop, so both async tests and the app under TestClient
(which has its own loop) can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import kubernetes_validate
from aiohttp import WSMsgType, web

from orchestrator.backends.local import spawn_runner, stop_runner

T = TypeVar("T")
TOKEN = "emulated-token"
SCHEMA_VERSION = "1.30.0"
MISSING_IMAGE_PREFIX = "missing/"
_MAX_FRAME = 64 * 1024 * 1024
_CHUNK = 64 * 1024


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message}
    return web.json_response({**body, "code": code}, status=code)


def _flag(value: str | None) -> bool:
    """A boolean query parameter as the API server parses it (Go's strconv.ParseBool)."""
    return (value or "").lower() in {"1", "t", "true"}


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _matches(pod: dict[str, Any], labels: str | None, fields: str | None) -> bool:
    have = pod["metadata"].get("labels") or {}
    for term in filter(None, (labels or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if have.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if have.get(key) != value.lstrip("="):
                return False
        elif term not in have:
            return False
    for term in filter(None, (fields or "").split(",")):
        key, value = term.split("=", 1)
        if key != "metadata.name" or pod["metadata"]["name"] != value:
            return False
    return True


@dataclass
class _Container:
    """The kubelet's view of one pod's sandbox container."""

    process: asyncio.subprocess.Process
    root: Path
    attached: set[web.WebSocketResponse] = field(default_factory=set)
    pump: asyncio.Task[None] | None = None


class Cluster:
    """The emulated control plane and its one node. Methods named ``*_sync`` are for test threads."""

    def __init__(self) -> None:
        self.url = ""
        self.attach_protocols: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._leases: dict[tuple[str, str], dict[str, Any]] = {}
        self._containers: dict[tuple[str, str], _Container] = {}
        self._version = 1000
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watches: set[web.StreamResponse] = set()

    # -- running --------------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="kube-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("emulated API server did not start")

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stopped = loop.create_future()
        loop.run_until_complete(self._main(ready))
        loop.close()

    async def _main(self, ready: threading.Event) -> None:
        self._changed = asyncio.Condition()
        app = web.Application(middlewares=[self._auth])
        base = "/api/v1/namespaces/{namespace}/pods"
        app.router.add_get("/version", self._version_info)
        app.router.add_get(base, self._list)
        app.router.add_post(base, self._create)
        app.router.add_get(base + "/{name}", self._get)
        app.router.add_patch(base + "/{name}", self._patch)
        app.router.add_delete(base + "/{name}", self._delete)
        app.router.add_get(base + "/{name}/attach", self._attach)
        leases = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        app.router.add_post(leases, self._create_lease)
        app.router.add_get(leases + "/{name}", self._get_lease)
        app.router.add_put(leases + "/{name}", self._replace_lease)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        ready.set()
        await self._stopped
        # Deletions in flight finish first: a runner killed but not yet waited for would outlive the loop.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for key in list(self._containers):
            await self._stop_container(key)
        for response in list(self._watches):
            with contextlib.suppress(Exception):
                await response.write_eof()
        await runner.cleanup()

    def stop(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._stopped.set_result, None)
        self._thread.join(30)

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the emulator's loop from a test thread and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(60)

    def kubeconfig(self, path: Path, namespace: str) -> Path:
        """A kubeconfig pointing at this server with a bearer token (JSON is valid YAML)."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
                    "users": [{"name": "orchestrator", "user": {"token": TOKEN}}],
                    "contexts": [
                        {
                            "name": "emulated",
                            "context": {"cluster": "emulated", "user": "orchestrator", "namespace": namespace},
                        }
                    ],
                    "current-context": "emulated",
                }
            )
        )
        return path

    # -- test helpers ---------------------------------------------------------------------------

    def pods_sync(self, namespace: str) -> list[dict[str, Any]]:
        async def snapshot() -> list[dict[str, Any]]:
            return [copy.deepcopy(p) for (ns, _), p in self._pods.items() if ns == namespace]

        return self.call(snapshot)

    def vanish_sync(self, namespace: str, name: str) -> None:
        """Someone else (an operator, node drain, eviction) deletes the pod."""
        self.call(lambda: self._remove(namespace, name))

    def touch_sync(self, namespace: str, name: str) -> None:
        """Someone else changes the pod (a label by an operator, a status by the kubelet)."""

        async def touch() -> None:
            pod = self._pods[(namespace, name)]
            pod["metadata"].setdefault("annotations", {})["example.com/touched"] = "yes"
            self._record("MODIFIED", pod)

        self.call(touch)

    def kill_runner_sync(self, namespace: str, name: str) -> None:
        """The sandbox's main process dies (the pod stays, its container terminated)."""

        async def kill() -> None:
            container = self._containers.get((namespace, name))
            if container is not None and container.process.returncode is None:
                container.process.kill()
                await container.process.wait()

        self.call(kill)

    # -- API ------------------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        response: web.StreamResponse = await handler(request)
        return response

    async def _version_info(self, _: web.Request) -> web.Response:
        return web.json_response({
            "major": "1", "minor": "30", "gitVersion": "v1.30.0-emulated", "gitCommit": "0" * 40,
            "gitTreeState": "clean", "buildDate": _now(), "goVersion": "go1.22", "compiler": "gc",
            "platform": "linux/amd64",
        })  # fmt: skip

    def _record(self, kind: str, pod: dict[str, Any]) -> None:
        assert self._changed is not None
        self._version += 1
        pod["metadata"]["resourceVersion"] = str(self._version)
        self._events.append((self._version, pod["metadata"]["namespace"], kind, copy.deepcopy(pod)))

        async def notify() -> None:
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()

        self._spawn(notify())

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        labels, fields = request.query.get("labelSelector"), request.query.get("fieldSelector")
        if _flag(request.query.get("watch")):
            return await self._watch(request, namespace, labels, fields)
        items = sorted(
            (p for (ns, _), p in self._pods.items() if ns == namespace and _matches(p, labels, fields)),
            key=lambda p: p["metadata"]["name"],
        )
        after = request.query.get("continue")
        if after:
            items = [p for p in items if p["metadata"]["name"] > after]
        limit = int(request.query.get("limit") or 0)
        token = ""
        if limit and len(items) > limit:
            items = items[:limit]
            token = items[-1]["metadata"]["name"]
        return web.json_response({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._version), "continue": token},
            "items": items,
        })  # fmt: skip

    async def _watch(
        self, request: web.Request, namespace: str, labels: str | None, fields: str | None
    ) -> web.StreamResponse:
        assert self._changed is not None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        self._watches.add(response)
        since = request.query.get("resourceVersion")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(request.query.get("timeoutSeconds") or 300)
        sent = self._version
        try:
            if since in {None, "", "0"}:
                for pod in list(self._pods.values()):
                    if pod["metadata"]["namespace"] == namespace and _matches(pod, labels, fields):
                        await response.write(json.dumps({"type": "ADDED", "object": pod}).encode() + b"\n")
            else:
                sent = int(since)
            while (remaining := deadline - loop.time()) > 0:
                for version, ns, kind, pod in self._events:
                    if version > sent and ns == namespace and _matches(pod, labels, fields):
                        await response.write(json.dumps({"type": kind, "object": pod}).encode() + b"\n")
                sent = max(sent, self._version)
                newer = functools.partial(self._newer_than, sent)
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait_for(newer), remaining)
        except (ConnectionResetError, RuntimeError):
            pass
        finally:
            self._watches.discard(response)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response

    def _newer_than(self, version: int) -> bool:
        return self._version > version

    async def _create(self, request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        pod = await request.json()
        try:
            kubernetes_validate.validate(pod, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return _status(422, "Invalid", f"Pod is invalid: {exc.message}")
        metadata = pod["metadata"]
        metadata.setdefault("namespace", namespace)
        if metadata["namespace"] != namespace:
            return _status(400, "BadRequest", "the namespace of the object does not match the request")
        key = (namespace, metadata["name"])
        if key in self._pods:
            return _status(409, "AlreadyExists", f'pods "{metadata["name"]}" already exists')
        metadata.update(uid=f"uid-{self._version}", creationTimestamp=_now())
        pod["status"] = {"phase": "Pending"}
        self._pods[key] = pod
        self._record("ADDED", pod)
        self._spawn(self._kubelet_start(key))
        return web.json_response(pod, status=201)

    def _found(self, request: web.Request) -> tuple[tuple[str, str], dict[str, Any] | None]:
        key = (request.match_info["namespace"], request.match_info["name"])
        return key, self._pods.get(key)

    async def _get(self, request: web.Request) -> web.Response:
        key, pod = self._found(request)
        if pod is None:
            return _status(404, "NotFound", f'pods "{key[1]}" not found')
        return web.json_response(pod)

    async def _patch(self, request: web.Request) -> web.Response:
        key, pod = self._found(request)
        if pod is None:
            return _status(404, "NotFound", f'pods "{key[1]}" not found')
        if request.content_type not in {"application/merge-patch+json", "application/strategic-merge-patch+json"}:
            return _status(415, "UnsupportedMediaType", f"unsupported patch type {request.content_type}")
        patch = await request.json()
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != pod["metadata"]["resourceVersion"]:
            return _status(
                409, "Conflict", f'Operation cannot be fulfilled on pods "{key[1]}": the object has been modified'
            )
        if "spec" in patch:
            return _status(422, "Invalid", "pod updates may not change the spec here")
        _merge(pod, patch)
        self._record("MODIFIED", pod)
        return web.json_response(pod)

    async def _delete(self, request: web.Request) -> web.Response:
        key, pod = self._found(request)
        if pod is None:
            return _status(404, "NotFound", f'pods "{key[1]}" not found')
        if not pod["metadata"].get("deletionTimestamp"):
            pod["metadata"]["deletionTimestamp"] = _now()
            pod["metadata"]["deletionGracePeriodSeconds"] = pod["spec"].get("terminationGracePeriodSeconds", 30)
            self._record("MODIFIED", pod)
            self._spawn(self._remove(*key))
        return web.json_response(pod)

    async def _attach(self, request: web.Request) -> web.StreamResponse:
        key, pod = self._found(request)
        if pod is None:
            return _status(404, "NotFound", f'pods "{key[1]}" not found')
        query = request.query
        if not (_flag(query.get("stdin")) and _flag(query.get("stdout"))) or _flag(query.get("tty")):
            return _status(400, "BadRequest", "attach needs stdin=true, stdout=true and no tty")
        container = self._containers.get(key)
        if container is None or container.process.returncode is not None:
            return _status(400, "BadRequest", f"container sandbox is not running in pod {key[1]}")
        socket = web.WebSocketResponse(protocols=("v5.channel.k8s.io", "v4.channel.k8s.io"), max_msg_size=0)
        await socket.prepare(request)
        self.attach_protocols.append(socket.ws_protocol or "")
        container.attached.add(socket)
        stdin = container.process.stdin
        assert stdin is not None
        try:
            async for message in socket:
                if message.type != WSMsgType.BINARY or not message.data:
                    continue
                data: bytes = message.data
                if data[0] == 0:
                    stdin.write(data[1:])
                    await stdin.drain()
                elif data[0] == 255 and data[1:2] == b"\x00" and socket.ws_protocol == "v5.channel.k8s.io":
                    stdin.close()
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            container.attached.discard(socket)
        return socket

    async def _lease_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The request's Lease, typed from the URL where the body leaves it out (as the API server does)."""
        lease: dict[str, Any] = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", **await request.json()}
        try:
            kubernetes_validate.validate(lease, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return _status(422, "Invalid", f"Lease is invalid: {exc.message}")
        return lease

    async def _create_lease(self, request: web.Request) -> web.Response:
        lease = await self._lease_body(request)
        if isinstance(lease, web.Response):
            return lease
        key = (request.match_info["namespace"], lease["metadata"]["name"])
        if key in self._leases:
            return _status(409, "AlreadyExists", f'leases.coordination.k8s.io "{key[1]}" already exists')
        self._version += 1
        lease["metadata"].update(namespace=key[0], resourceVersion=str(self._version))
        self._leases[key] = lease
        return web.json_response(lease, status=201)

    async def _get_lease(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        if key not in self._leases:
            return _status(404, "NotFound", f'leases.coordination.k8s.io "{key[1]}" not found')
        return web.json_response(self._leases[key])

    async def _replace_lease(self, request: web.Request) -> web.Response:
        """PUT: the whole object, refused unless it carries the current resourceVersion."""
        key = (request.match_info["namespace"], request.match_info["name"])
        lease = await self._lease_body(request)
        if isinstance(lease, web.Response):
            return lease
        current = self._leases.get(key)
        if current is None:
            return _status(404, "NotFound", f'leases.coordination.k8s.io "{key[1]}" not found')
        if lease["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", f'Operation cannot be fulfilled on leases "{key[1]}"')
        self._version += 1
        lease["metadata"]["resourceVersion"] = str(self._version)
        self._leases[key] = lease
        return web.json_response(lease)

    def lease_holder_sync(self, namespace: str, name: str) -> str | None:
        async def holder() -> str | None:
            lease = self._leases.get((namespace, name))
            return None if lease is None else lease["spec"].get("holderIdentity")

        return self.call(holder)

    # -- kubelet --------------------------------------------------------------------------------

    async def _kubelet_start(self, key: tuple[str, str]) -> None:
        pod = self._pods.get(key)
        if pod is None:
            return
        spec = pod["spec"]["containers"][0]
        if spec["image"].startswith(MISSING_IMAGE_PREFIX):
            self._set_container(key, "Pending", {"waiting": {"reason": "ErrImageNeverPull"}})
            return
        environment = {e["name"]: e["value"] for e in spec.get("env") or []}
        process, root = await spawn_runner(environment, max_frame_bytes=_MAX_FRAME)
        container = _Container(process, root)
        if key not in self._pods:  # deleted while starting
            await stop_runner(process, root)
            return
        self._containers[key] = container
        container.pump = asyncio.ensure_future(self._pump_stdout(key, container))
        self._set_container(key, "Running", {"running": {"startedAt": _now()}})

    async def _pump_stdout(self, key: tuple[str, str], container: _Container) -> None:
        """The container's stdout to every attached client, then its end on the error channel."""
        stdout = container.process.stdout
        assert stdout is not None
        while chunk := await stdout.read(_CHUNK):
            for socket in list(container.attached):
                with contextlib.suppress(ConnectionResetError, RuntimeError):
                    await socket.send_bytes(b"\x01" + chunk)
        code = await container.process.wait()
        status = {"status": "Success"} if code == 0 else {"status": "Failure", "reason": "NonZeroExitCode"}
        for socket in list(container.attached):
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await socket.send_bytes(b"\x03" + json.dumps(status).encode())
                await socket.close()
        if key in self._pods and not self._pods[key]["metadata"].get("deletionTimestamp"):
            phase = "Succeeded" if code == 0 else "Failed"
            self._set_container(key, phase, {"terminated": {"exitCode": code, "finishedAt": _now()}})

    def _set_container(self, key: tuple[str, str], phase: str, state: dict[str, Any]) -> None:
        pod = self._pods.get(key)
        if pod is None:
            return
        pod["status"] = {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": pod["spec"]["containers"][0]["name"],
                    "image": pod["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "ready": "running" in state,
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
        self._record("MODIFIED", pod)

    async def _stop_container(self, key: tuple[str, str]) -> None:
        container = self._containers.pop(key, None)
        if container is None:
            return
        await stop_runner(container.process, container.root)
        if container.pump is not None:
            with contextlib.suppress(Exception):
                await container.pump

    async def _remove(self, namespace: str, name: str) -> None:
        """The kubelet kills the container; then the object goes from the store."""
        key = (namespace, name)
        await self._stop_container(key)
        pod = self._pods.pop(key, None)
        if pod is not None:
            self._record("DELETED", pod)
