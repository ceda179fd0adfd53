"""Crash safety of MIG prepare/unprepare (issue: MIG partitions): the real plugin process is SIGKILLed at
each step between two side effects (driver.plugin.faults), restarted, and the node must end with no
orphaned MIG instance, whatever the kubelet does next: retry the prepare, unprepare a claim deleted
meanwhile, or forget the claim altogether (the plugin's start-up cleanup must then destroy it)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
from pathlib import Path

import grpc
import pytest

from controller.sandbox.apiserver import ApiServer
from controller.sandbox.plugin import PluginProcess
from driver.api import naming
from driver.inventory import discover
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.faults import ENV, PREPARE_POINTS, UNPREPARE_POINTS
from tests.support.claims import allocated_claim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:1", NODE)


class Node:
    """One node: the API server, its plugin process (restartable) and a view of its fake GPU."""

    def __init__(self, tmp_path, server: ApiServer, url: str):
        self.tmp_path = tmp_path
        self.server = server
        self.url = url
        self.plugin: PluginProcess | None = None

    async def start(self, crash_at: str | None = None) -> None:
        self.plugin = PluginProcess(PROFILE, PROFILE.nodes[0], self.tmp_path, self.url, DRIVER, "DEBUG",
                                    env={ENV: crash_at} if crash_at else None)
        self.plugin.start()
        await self.plugin.wait_ready()

    def gpu(self):
        backend = open_backend("fake", profile=PROFILE, node_name=NODE,
                               state_dir=self.plugin.paths.plugin_dir(DRIVER) / "fake-nvml")
        backend.init()
        return backend, backend.device_by_index(0), discover(backend, NODE)

    async def call(self, method: str, claim: dict):
        md = claim["metadata"]
        req_type = v1.NodePrepareResourcesRequest if method == "NodePrepareResources" else v1.NodeUnprepareResourcesRequest
        req = req_type(claims=[v1.Claim(namespace=md["namespace"], name=md["name"], uid=md["uid"])])
        async with grpc.aio.insecure_channel(f"unix://{self.plugin.paths.plugins / DRIVER / 'dra.sock'}") as ch:
            resp = await getattr(v1_grpc.DRAPluginStub(ch), method)(req, timeout=20)
        return resp.claims[md["uid"]]

    async def call_and_die(self, method: str, claim: dict) -> None:
        with pytest.raises(grpc.aio.AioRpcError):
            await self.call(method, claim)
        assert self.plugin.proc.wait(10) == -signal.SIGKILL, self.plugin.log_tail()

    def cdi_specs(self) -> list[str]:
        cdi = self.plugin.paths.cdi
        return sorted(p.name for p in cdi.glob("*")) if cdi.exists() else []

    def clean(self) -> bool:
        backend, h, _ = self.gpu()
        return not backend.gpu_instances(h) and not backend.mig_mode(h).current and not self.cdi_specs()

    def assert_clean(self) -> None:
        backend, h, _ = self.gpu()
        assert backend.gpu_instances(h) == [], f"orphaned MIG instances: {backend.gpu_instances(h)}"
        assert backend.mig_mode(h).current is False, "MIG mode left on with no MIG device in use"
        assert self.cdi_specs() == []


@pytest.fixture
def tmp_path():
    """Short: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="crash-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _scenario(tmp_path, body) -> None:
    async def main():
        server = ApiServer()
        url = await server.start()
        node = Node(tmp_path, server, url)
        try:
            await body(node)
        finally:
            if node.plugin is not None:
                node.plugin.stop()
            await server.stop()
    asyncio.run(main())


def _mig_claim(node: Node) -> dict:
    _, _, inv = node.gpu()
    device = naming.mig_device_name(naming.gpu_device_name(inv.gpus[0].uuid), "3g.40gb", 4)
    return node.server.create(allocated_claim("mig-3g", [device]))


@pytest.mark.parametrize("then", ["retry", "deleted", "forgotten"])
@pytest.mark.parametrize("point", PREPARE_POINTS)
def test_a_crash_during_mig_prepare_leaves_no_orphan(tmp_path, point: str, then: str) -> None:
    async def body(node: Node) -> None:
        await node.start(crash_at=point)
        claim = _mig_claim(node)
        await node.call_and_die("NodePrepareResources", claim)
        await node.start()                     # the DaemonSet restarts the plugin
        backend, h, _ = node.gpu()
        if then == "retry":                    # the pod is still there: the kubelet prepares again
            res = await node.call("NodePrepareResources", claim)
            assert res.error == "", res.error
            [gi] = backend.gpu_instances(h)
            assert (gi.placement.start, gi.placement.size) == (4, 4)
            assert len(node.cdi_specs()) == 1
            assert (await node.call("NodeUnprepareResources", claim)).error == ""
        elif then == "deleted":                # the pod and claim went away: the kubelet unprepares
            node.server.delete("resourceclaims", "mig-3g", "default", group="resource.k8s.io")
            assert (await node.call("NodeUnprepareResources", claim)).error == ""
        else:                                  # nobody will ever call unprepare: start-up cleanup must
            node.server.delete("resourceclaims", "mig-3g", "default", group="resource.k8s.io")
            await node.plugin.wait_ready()
            node.plugin.stop()
            await node.start()
            await _until(node.clean)     # the start-up cleanup runs in the background
        node.assert_clean()
    _scenario(tmp_path, body)


@pytest.mark.parametrize("point", UNPREPARE_POINTS)
def test_a_crash_during_mig_unprepare_is_finished_by_the_retry(tmp_path, point: str) -> None:
    async def body(node: Node) -> None:
        await node.start(crash_at=point)
        claim = _mig_claim(node)
        assert (await node.call("NodePrepareResources", claim)).error == ""
        backend, h, _ = node.gpu()
        assert len(backend.gpu_instances(h)) == 1
        node.server.delete("resourceclaims", "mig-3g", "default", group="resource.k8s.io")
        await node.call_and_die("NodeUnprepareResources", claim)
        await node.start()
        assert (await node.call("NodeUnprepareResources", claim)).error == ""
        node.assert_clean()
    _scenario(tmp_path, body)


def test_instances_of_claims_deleted_while_the_plugin_was_down_are_destroyed_at_start(tmp_path) -> None:
    async def body(node: Node) -> None:
        await node.start()
        claim = _mig_claim(node)
        assert (await node.call("NodePrepareResources", claim)).error == ""
        node.plugin.stop()
        node.server.delete("resourceclaims", "mig-3g", "default", group="resource.k8s.io")
        # a claim of the same name, re-created with a new uid, is not the prepared one either
        node.server.create(allocated_claim("mig-3g", []))
        await node.start()
        await _until(node.clean)     # the start-up cleanup runs in the background
        node.assert_clean()
        assert "which no longer exists" in node.plugin.paths.log.read_text()
    _scenario(tmp_path, body)


async def _until(predicate, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)
