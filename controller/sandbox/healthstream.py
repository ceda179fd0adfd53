"""The kubelet stand-in's side of the device health stream (KEP-4680), as the kubelet does it
(pkg/kubelet/cm/dra ``HandleWatchResourcesStream``, ``UpdateAllocatedResourcesStatus``): it keeps
``NodeWatchResources`` open on the registered plugin's DRA socket (reopened 0.5 s after it ends here, 5 s in
the kubelet), caches health per (pool, device) — cleared when the stream ends — and writes, for every pod it
runs, ``status.containerStatuses[].allocatedResourcesStatus``: per container and claim reference
``name: claim:<pod claim name>[/<request>]`` with ``resources[]`` of ``resourceID`` (the device's first CDI
device ID, else ``<driver>/<pool>/<device>``) and ``health`` (Healthy, Unhealthy, Unknown)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from driver.kubeletapi.drahealth.v1 import api_pb2 as pb
from driver.kubeletapi.drahealth.v1 import api_pb2_grpc as pb_grpc

from .kubelet import Kubelet

log = logging.getLogger(__name__)
_HEALTH = {pb.HEALTHY: "Healthy", pb.UNHEALTHY: "Unhealthy"}


class HealthStream:
    def __init__(self, kubelet: Kubelet, retry_seconds: float = 0.5):
        self.kubelet = kubelet
        self.retry = retry_seconds
        self.health: dict[tuple[str, str], str] = {}
        self.messages = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            endpoint = self.kubelet.endpoint
            if endpoint is not None:
                try:
                    async with grpc.aio.insecure_channel(f"unix://{endpoint}") as ch:
                        async for resp in pb_grpc.DRAResourceHealthStub(ch).NodeWatchResources(
                                pb.NodeWatchResourcesRequest()):
                            self.messages += 1
                            self.health = {(d.device.pool_name, d.device.device_name): _HEALTH.get(d.health, "Unknown")
                                           for d in resp.devices}
                            self.apply()
                            if stop.is_set():
                                break
                except grpc.aio.AioRpcError as e:
                    log.debug("node %s: health stream ended: %s", self.kubelet.node, e.code().name)
                self.health = {}
            try:
                await asyncio.wait_for(stop.wait(), self.retry)
            except asyncio.TimeoutError:
                pass

    def apply(self) -> None:
        """Write the pods' allocatedResourcesStatus where it changed."""
        server, driver = self.kubelet.server, self.kubelet.driver
        for pod_key, prepared in list(self.kubelet.prepared.items()):
            ns, name = pod_key.split("/", 1)
            pod = server.get("pods", name, ns)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                continue
            spec, status = pod.get("spec") or {}, pod.get("status") or {}
            by_status = {s.get("name"): s.get("resourceClaimName") for s in status.get("resourceClaimStatuses") or []}
            claim_of = {rc["name"]: rc.get("resourceClaimName") or by_status.get(rc["name"])
                        for rc in spec.get("resourceClaims") or []}
            containers = []
            for c in spec.get("containers") or []:
                statuses = []
                for ref in (c.get("resources") or {}).get("claims") or []:
                    devices = prepared.claims.get(claim_of.get(ref["name"]) or "", [])
                    request = ref.get("request")
                    resources = [{"resourceID": (d["cdi"][0] if d["cdi"] else f"{driver}/{d['pool']}/{d['device']}"),
                                  "health": self.health.get((d["pool"], d["device"]), "Unknown")}
                                 for d in devices if not request or request in d["requests"]]
                    if resources:
                        statuses.append({"name": f"claim:{ref['name']}" + (f"/{request}" if request else ""),
                                         "resources": resources})
                containers.append({"name": c["name"], "allocatedResourcesStatus": statuses})
            old = [{"name": s.get("name"), "allocatedResourcesStatus": s.get("allocatedResourcesStatus") or []}
                   for s in status.get("containerStatuses") or []]
            if old != containers:
                pod["status"] = {**status, "containerStatuses": containers}
                server.update_status(pod)
