"""A kubelet stand-in for one node: it speaks to the node's plugin exactly as the kubelet does.

* registration: finds the driver's registration sockets in the registry directory, ``<driver>-reg.sock``
  or per instance ``<driver>-<uid>-reg.sock`` (driver/plugin/sockets.py), calls GetInfo, checks the plugin
  type, name and versions and that no registered instance has its endpoint, then NotifyRegistrationStatus;
  like the kubelet's DRAPluginManager (1.33+) it keeps every instance in registration order, calls the
  most recently registered one that accepts connections, and deregisters an instance (by its endpoint
  only) when its registration socket is gone, so an old instance serves until a new one registers and the
  old one's exit does not drop the new one;
* pods bound to the node: NodePrepareResources for their claims (v1 service), then the pod is Running;
  the CDI device IDs the plugin returned are kept for the report;
* pods being deleted (the stand-in keeps a finalizer on the pods it runs, as graceful deletion would):
  NodeUnprepareResources for claims no other running pod uses, then the finalizer is dropped.

It never touches claims' allocations; reservedFor belongs to the binder and the claim controller.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from driver.api.objects import allocated_results, key, pod_claim_names
from driver.kubeletapi.dra.v1 import api_pb2 as dra
from driver.kubeletapi.dra.v1 import api_pb2_grpc as dra_grpc
from driver.kubeletapi.pluginregistration.v1 import api_pb2 as reg
from driver.kubeletapi.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from driver.plugin.sockets import registration_sockets

from .apiserver import ApiServer

log = logging.getLogger(__name__)
FINALIZER = "sandbox.partita.dev/kubelet"
RPC_TIMEOUT = 30.0


@dataclass(frozen=True)
class Instance:
    """One registered plugin instance."""
    socket: Path          # its registration socket
    endpoint: str         # its DRA socket, from GetInfo


@dataclass
class PreparedPod:
    claims: dict[str, list[dict]] = field(default_factory=dict)     # claim name -> devices (pool, device, cdi)


class Kubelet:
    def __init__(self, server: ApiServer, node: str, registry: Path, driver: str):
        self.server = server
        self.node = node
        self.registry = registry
        self.driver = driver
        self.instances: list[Instance] = []          # registration order, newest last
        self.prepared: dict[str, PreparedPod] = {}    # pod key -> what prepare returned
        self.failures: dict[str, str] = {}            # pod key -> last prepare error
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self.rpcs = 0

    # -- registration ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str | None:
        """The newest registered instance's DRA socket."""
        return self.instances[-1].endpoint if self.instances else None

    async def register(self) -> None:
        """One pass of the kubelet's plugin watcher: deregister instances whose registration socket is gone,
        register the sockets not registered yet. Refusals raise; a socket that does not answer is skipped
        (the kubelet retries it) unless no instance is registered at all."""
        present = registration_sockets(self.registry, self.driver)
        for gone in [i for i in self.instances if i.socket not in present or not i.socket.exists()]:
            self.instances.remove(gone)
            log.info("node %s: deregistered plugin %s at %s", self.node, self.driver, gone.endpoint)
        unreachable: Exception | None = None
        for sock in present:
            if any(i.socket == sock for i in self.instances):
                continue
            try:
                await self._register_one(sock)
            except grpc.aio.AioRpcError as e:
                unreachable = e
        if not self.instances:
            raise RuntimeError(f"node {self.node}: no plugin of {self.driver} registered in {self.registry}"
                               + (f": {unreachable.code().name}: {unreachable.details()}" if unreachable else ""))

    async def _register_one(self, sock: Path) -> None:
        async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
            stub = reg_grpc.RegistrationStub(ch)
            info = await stub.GetInfo(reg.InfoRequest(), timeout=RPC_TIMEOUT)
            problem = ""
            if info.type != "DRAPlugin":
                problem = f"plugin type {info.type!r} is not DRAPlugin"
            elif info.name != self.driver:
                problem = f"plugin name {info.name!r} is not {self.driver!r}"
            elif "v1.DRAPlugin" not in info.supported_versions:
                problem = f"plugin supports {list(info.supported_versions)}, not v1.DRAPlugin"
            elif any(i.endpoint == info.endpoint for i in self.instances):
                problem = f"endpoint {info.endpoint} already registered for DRA driver plugin {self.driver}"
            try:
                await stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=not problem,
                                                                           error=problem), timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError:
                if not problem:
                    raise
                # a refused plugin may answer the notification with an error (ours does): refused either way
            if problem:
                raise RuntimeError(f"node {self.node}: registration refused: {problem}")
            self.instances.append(Instance(sock, info.endpoint))
        log.info("node %s: registered plugin %s at %s (%d instance(s))", self.node, self.driver, info.endpoint,
                 len(self.instances))

    # -- pods -------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Start prepare/unprepare work for this node's pods (called on every change)."""
        for pod in self.server.list("pods"):
            if (pod.get("spec") or {}).get("nodeName") != self.node:
                continue
            md = pod["metadata"]
            k = key(pod)
            if k in self._busy:
                continue
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if md.get("deletionTimestamp") or (phase in ("Succeeded", "Failed")
                                               and FINALIZER in (md.get("finalizers") or [])):
                self._spawn(k, self._stop_pod(pod))     # deleted, or its containers finished (a Job's pod)
            elif phase == "Pending" and k not in self.failures:
                self._spawn(k, self._start_pod(pod))

    def _spawn(self, k: str, coro) -> None:  # noqa: ANN001
        self._busy.add(k)
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._busy.discard(k)
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("node %s: pod %s: %r", self.node, k, t.exception())

        task.add_done_callback(done)

    def _claims(self, pod: dict) -> list[dict]:
        ns = pod["metadata"]["namespace"]
        out = []
        for name in pod_claim_names(pod):
            c = self.server.get("resourceclaims", name, ns, group="resource.k8s.io")
            if c is not None:
                out.append(c)
        return out

    async def _start_pod(self, pod: dict) -> None:
        md = pod["metadata"]
        k = key(pod)
        if FINALIZER not in (md.get("finalizers") or []):
            fresh = self.server.get("pods", md["name"], md["namespace"])
            if fresh is None:
                return
            fresh["metadata"]["finalizers"] = [*(fresh["metadata"].get("finalizers") or []), FINALIZER]
            pod = self.server.update(fresh)
        claims = [c for c in self._claims(pod) if self._ours(c)]
        result = PreparedPod()
        if claims:
            try:
                resp = await self._call("NodePrepareResources", dra.NodePrepareResourcesRequest(claims=[
                    dra.Claim(namespace=c["metadata"]["namespace"], name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in claims]))
            except grpc.aio.AioRpcError as e:
                self._fail(pod, k, f"NodePrepareResources failed: {e.code().name}: {e.details()}")
                return
            errors = []
            for c in claims:
                r = resp.claims.get(c["metadata"]["uid"])
                if r is None or r.error:
                    errors.append(f"claim {c['metadata']['name']}: {r.error if r else 'no answer'}")
                    continue
                result.claims[c["metadata"]["name"]] = [
                    {"pool": d.pool_name, "device": d.device_name, "cdi": list(d.cdi_device_ids),
                     "requests": list(d.request_names), "share": d.share_id if d.HasField("share_id") else ""}
                    for d in r.devices]
            if errors:
                self._fail(pod, k, "; ".join(errors))
                return
        self.prepared[k] = result
        fresh = self.server.get("pods", md["name"], md["namespace"])
        if fresh is not None and not fresh["metadata"].get("deletionTimestamp"):
            fresh["status"] = {**(fresh.get("status") or {}), "phase": "Running",
                               "conditions": [{"type": "Ready", "status": "True"}]}
            self.server.update_status(fresh)

    def _fail(self, pod: dict, k: str, message: str) -> None:
        self.failures[k] = message
        log.error("node %s: pod %s cannot start: %s", self.node, k, message)
        fresh = self.server.get("pods", pod["metadata"]["name"], pod["metadata"]["namespace"])
        if fresh is not None:
            fresh["status"] = {**(fresh.get("status") or {}), "phase": "Pending",
                               "conditions": [{"type": "Ready", "status": "False", "reason": "PrepareFailed",
                                               "message": message}]}
            self.server.update_status(fresh)

    async def _stop_pod(self, pod: dict) -> None:
        md = pod["metadata"]
        k = key(pod)
        still_used = set()
        for other in self.server.list("pods"):
            omd = other["metadata"]
            if (other.get("spec") or {}).get("nodeName") == self.node and not omd.get("deletionTimestamp") \
                    and omd.get("uid") != md.get("uid") \
                    and (other.get("status") or {}).get("phase") not in ("Succeeded", "Failed") \
                    and key(other) in self.prepared:
                still_used.update(pod_claim_names(other))
        claims = [c for c in self._claims(pod) if self._ours(c) and c["metadata"]["name"] not in still_used]
        if claims:
            try:
                resp = await self._call("NodeUnprepareResources", dra.NodeUnprepareResourcesRequest(claims=[
                    dra.Claim(namespace=c["metadata"]["namespace"], name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in claims]))
            except grpc.aio.AioRpcError as e:
                log.error("node %s: unprepare for pod %s failed: %s; retrying", self.node, k, e.details())
                await asyncio.sleep(0.5)
                return
            errors = [f"{uid}: {r.error}" for uid, r in resp.claims.items() if r.error]
            if errors:
                log.error("node %s: unprepare for pod %s failed: %s; retrying", self.node, k, "; ".join(errors))
                await asyncio.sleep(0.5)
                return
        self.prepared.pop(k, None)
        self.failures.pop(k, None)
        fresh = self.server.get("pods", md["name"], md["namespace"])
        if fresh is not None:
            fresh["metadata"]["finalizers"] = [f for f in fresh["metadata"].get("finalizers") or [] if f != FINALIZER]
            self.server.update(fresh)

    def _ours(self, claim: dict) -> bool:
        return any(r.get("driver") == self.driver for r in allocated_results(claim))

    async def _call(self, method: str, request):  # noqa: ANN001, ANN202
        """The newest registered instance that accepts a connection answers; an older one only while the
        newer ones do not (as the kubelet prefers connected plugins, newest first)."""
        if self.registry.exists():
            try:
                await self.register()
            except RuntimeError:
                pass
        if not self.instances:
            raise RuntimeError(f"node {self.node}: the plugin is not registered")
        self.rpcs += 1
        last: grpc.aio.AioRpcError | None = None
        for inst in reversed(list(self.instances)):
            async with grpc.aio.insecure_channel(f"unix://{inst.endpoint}") as ch:
                try:
                    return await getattr(dra_grpc.DRAPluginStub(ch), method)(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    last = e
        assert last is not None
        raise last

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
