"""A small emulated cluster for controller tests: API emulator, nodes, Partita DeviceClasses and the
ResourceSlices a node's driver would publish (built from the fake NVML), plus pod and claim builders."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from controller.operator.controller import ControllerConfig
from controller.operator.main import Running
from controller.sandbox.apiserver import ApiServer
from controller.sandbox.threads import ControllerThread
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.slices import SliceFeatures, build_slices


def node(name: str, labels: dict | None = None, taints: list | None = None, cpu: str = "64") -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"cpu": cpu, "memory": "512Gi", "pods": "110"}}}


def node_slices(name: str, spec: str, features: SliceFeatures = SliceFeatures(), uid: str = "") -> list[dict]:
    backend = open_backend("fake", profile=profile_from_spec(spec, name), node_name=name)
    backend.init()
    return build_slices(discover(backend, name), features=features, node_uid=uid)


def claim(name: str, requests: list[dict], namespace: str = "default", config: list | None = None,
          constraints: list | None = None) -> dict:
    devices: dict = {"requests": requests}
    if config:
        devices["config"] = config
    if constraints:
        devices["constraints"] = constraints
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"devices": devices}}


def request(name: str = "gpu", cls: str = C.DEVICE_CLASS_GPU, count: int = 1, selectors: list[str] = (),
            **extra) -> dict:
    exactly = {"deviceClassName": cls, "allocationMode": "ExactCount", "count": count, **extra}
    if selectors:
        exactly["selectors"] = [{"cel": {"expression": s}} for s in selectors]
    return {"name": name, "exactly": exactly}


def pod(name: str, claims: list[str], namespace: str = "default", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"containers": [{"name": "main", "image": "busybox",
                                     "resources": {"claims": [{"name": c} for c in claims]}}],
                     "resourceClaims": [{"name": c, "resourceClaimName": c} for c in claims], **spec},
            "status": {"phase": "Pending"}}


class Cluster:
    def __init__(self, server: ApiServer, running: list[Running], ctl: "ControllerThread | None" = None):
        self.server = server
        self.running = running
        self._ctl = ctl

    def _stop_controller(self) -> None:
        """Stop the controller (blocking; run it in an executor)."""
        if self._ctl is not None:
            self._ctl.stop()

    @property
    def controller(self):  # noqa: ANN201
        return self.running[-1].controller

    def add_node(self, name: str, spec: str, features: SliceFeatures = SliceFeatures(), **kw) -> None:
        n = self.server.create(node(name, **kw))
        for s in node_slices(name, spec, features, uid=n["metadata"]["uid"]):
            self.server.create(s)

    def submit(self, p: dict, *claims: dict) -> None:
        for c in claims:
            self.server.create(c)
        self.server.create(p)

    def claim(self, name: str, namespace: str = "default") -> dict:
        return self.server.get("resourceclaims", name, namespace, group="resource.k8s.io")

    def events(self, reason: str | None = None) -> list[tuple[str, str, str]]:
        return [e for e in self.controller.events.posted if reason is None or e[1] == reason]

    async def allocated(self, name: str, namespace: str = "default", timeout: float = 10.0) -> dict:
        return await self.server.wait_for(
            lambda s: (lambda c: c if c and (c.get("status") or {}).get("allocation") else None)(
                s.get("resourceclaims", name, namespace, group="resource.k8s.io")), timeout)

    async def event(self, reason: str, timeout: float = 10.0) -> tuple[str, str, str]:
        return await self.server.wait_for(lambda _: next(iter(self.events(reason)), None), timeout)


@contextlib.asynccontextmanager
async def cluster(cfg: ControllerConfig | None = None, *, classes: bool = True,
                  leader_election: tuple[str, str] | None = None) -> AsyncIterator[Cluster]:
    server = ApiServer(bookmark_interval=0.5)
    await server.start()
    if classes:
        for c in device_classes():
            server.create(c)
    running: list[Running] = []
    ctl = ControllerThread(cfg or ControllerConfig(retry_min=0.2, retry_max=2.0), server.url, running,
                           leader_election)
    try:
        await asyncio.get_running_loop().run_in_executor(None, ctl.start)
        yield Cluster(server, running, ctl)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, ctl.stop)
        await server.stop()


#: retries and reports fast enough for tests
FAST = dict(retry_min=0.1, retry_max=1.0, report_after=0.3)


def run(scenario, **cfg) -> None:  # noqa: ANN001
    """Run ``await scenario(cl)`` against a fresh :func:`cluster` whose controller has ``FAST`` settings
    overridden by ``cfg``."""
    async def main() -> None:
        async with cluster(ControllerConfig(**{**FAST, **cfg})) as cl:
            await scenario(cl)
    asyncio.run(main())


def is_allocated(cl, name: str) -> bool:  # noqa: ANN001
    return bool((cl.claim(name).get("status") or {}).get("allocation"))
