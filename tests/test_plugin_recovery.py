"""The real plugin process (fake GPUs) after failure (issue: safety): a crash during unprepare, a node
reboot and an undecodable checkpoint never give a stale answer or a crash loop."""

from __future__ import annotations

import asyncio
import json
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
from driver.nvml.interface import Placement
from driver.plugin import boot
from driver.plugin.faults import ENV
from tests.support.claims import allocated_claim
from tests.support.node_check import check_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:1", NODE)


class Node:
    def __init__(self, root: Path, server: ApiServer, url: str):
        self.root, self.server, self.url = root, server, url
        self.boot_file = root / "boot_id"
        self.boot_file.write_text("boot-1\n")
        self.plugin: PluginProcess | None = None

    async def start(self, crash_at: str | None = None) -> None:
        env = {boot.ENV: str(self.boot_file), **({ENV: crash_at} if crash_at else {})}
        self.plugin = PluginProcess(PROFILE, PROFILE.nodes[0], self.root, self.url, DRIVER, "DEBUG", env=env)
        self.plugin.start()
        await self.plugin.wait_ready()

    @property
    def plugin_dir(self) -> Path:
        return self.plugin.paths.plugin_dir(DRIVER)

    def gpu(self):
        backend = open_backend("fake", profile=PROFILE, node_name=NODE, state_dir=self.plugin_dir / "fake-nvml")
        backend.init()
        return backend, backend.device_by_index(0), discover(backend, NODE)

    async def call(self, method: str, claim: dict):
        md = claim["metadata"]
        req_type = v1.NodePrepareResourcesRequest if method == "NodePrepareResources" else v1.NodeUnprepareResourcesRequest
        req = req_type(claims=[v1.Claim(namespace=md["namespace"], name=md["name"], uid=md["uid"])])
        async with grpc.aio.insecure_channel(f"unix://{self.plugin_dir / 'dra.sock'}",
                                             options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            resp = await getattr(v1_grpc.DRAPluginStub(ch), method)(req, timeout=20)
        return resp.claims[md["uid"]]

    def mig_claim(self, name: str, profile: str, start: int) -> dict:
        _, _, inv = self.gpu()
        device = naming.mig_device_name(naming.gpu_device_name(inv.gpus[0].uuid), profile, start)
        return self.server.create(allocated_claim(name, [device]))

    def violations(self, *prepared: dict) -> list[str]:
        return check_node(plugin_dir=self.plugin_dir, cdi_dir=self.plugin.paths.cdi, profile=PROFILE, node_name=NODE,
                          expected_uids={c["metadata"]["uid"] for c in prepared})


def _scenario(body) -> None:
    async def main():
        root = Path(tempfile.mkdtemp(prefix="recov-", dir="/tmp"))     # short: unix socket paths
        server = ApiServer()
        url = await server.start()
        node = Node(root, server, url)
        try:
            await body(node)
        finally:
            if node.plugin is not None:
                node.plugin.stop()
            await server.stop()
            shutil.rmtree(root, ignore_errors=True)
    asyncio.run(main())


def test_a_crash_after_unprepare_removed_the_spec_is_not_answered_stale() -> None:
    """Kill after the MIG instance and the CDI spec are gone, before the checkpoint dropped the claim: the
    kubelet's next prepare of the claim used to answer success with a CDI device that did not exist, and a
    7g.80gb claim on the same placement was accepted too."""
    async def body(node: Node) -> None:
        await node.start(crash_at="cdi-spec-removed")
        claim = node.mig_claim("mig-3g", "3g.40gb", 4)
        assert (await node.call("NodePrepareResources", claim)).error == ""
        with pytest.raises(grpc.aio.AioRpcError):
            await node.call("NodeUnprepareResources", claim)
        assert node.plugin.proc.wait(10) == -signal.SIGKILL
        await node.start()
        res = await node.call("NodePrepareResources", claim)       # the pod is still there
        assert res.error == ""
        backend, h, _ = node.gpu()
        (mig,) = backend.mig_devices(h)
        assert (mig.profile_name, mig.placement) == ("3g.40gb", Placement(4, 4))
        spec = json.loads(next(node.plugin.paths.cdi.glob("*.json")).read_text())
        assert f"NVIDIA_VISIBLE_DEVICES={mig.uuid}" in spec["devices"][0]["containerEdits"]["env"]
        big = node.mig_claim("mig-7g", "7g.80gb", 0)
        assert "overlaps" in (await node.call("NodePrepareResources", big)).error
        assert node.violations(claim) == []
        assert (await node.call("NodeUnprepareResources", claim)).error == ""
        assert node.violations() == []
    _scenario(body)


def test_a_node_reboot_re_creates_the_instances_of_prepared_claims() -> None:
    """Reboot: the fake GPUs come back from their profile (no instances, MIG off), /var/run/cdi is empty, a
    new boot id; the checkpoint is kept. The restarted plugin restores the claim before serving."""
    async def body(node: Node) -> None:
        await node.start()
        claim = node.mig_claim("mig-3g", "3g.40gb", 4)
        assert (await node.call("NodePrepareResources", claim)).error == ""
        node.plugin.proc.send_signal(signal.SIGKILL)
        node.plugin.proc.wait(10)
        shutil.rmtree(node.plugin_dir / "fake-nvml")
        for f in node.plugin.paths.cdi.glob("*"):
            f.unlink()
        node.boot_file.write_text("boot-2\n")
        await node.start()
        assert node.violations(claim) == []               # instance and spec are back, as recorded
        big = node.mig_claim("mig-7g", "7g.80gb", 0)
        assert "overlaps" in (await node.call("NodePrepareResources", big)).error
        assert (await node.call("NodePrepareResources", claim)).error == ""
        assert (await node.call("NodeUnprepareResources", claim)).error == ""
        assert node.violations() == []
    _scenario(body)


def test_a_node_reboot_restores_a_monitoring_claim_on_the_instance_of_another() -> None:
    """An admin-access claim on another claim's MIG device: the reboot re-creates the instance once (for
    its owner), the monitoring claim follows it to the new instance, and neither unprepare leaves an
    orphan or destroys the other's."""
    async def body(node: Node) -> None:
        await node.start()
        work = node.mig_claim("mig-3g", "3g.40gb", 4)
        _, _, inv = node.gpu()
        device = naming.mig_device_name(naming.gpu_device_name(inv.gpus[0].uuid), "3g.40gb", 4)
        dcgm = node.server.create(allocated_claim("dcgm", [device], admin_access=True))
        assert (await node.call("NodePrepareResources", work)).error == ""
        assert (await node.call("NodePrepareResources", dcgm)).error == ""
        assert node.violations(work, dcgm) == []
        node.plugin.proc.send_signal(signal.SIGKILL)
        node.plugin.proc.wait(10)
        shutil.rmtree(node.plugin_dir / "fake-nvml")
        for f in node.plugin.paths.cdi.glob("*"):
            f.unlink()
        node.boot_file.write_text("boot-2\n")
        await node.start()
        assert (await node.call("NodePrepareResources", dcgm)).error == ""
        backend, h, _ = node.gpu()
        (mig,) = backend.mig_devices(h)                       # one instance, re-created for its owner
        spec = json.loads((node.plugin.paths.cdi / f"k8s.gpu.partita.dev-gpu_{dcgm['metadata']['uid']}.json")
                          .read_text())
        env = spec["devices"][0]["containerEdits"]["env"]
        assert f"NVIDIA_VISIBLE_DEVICES={mig.uuid}" in env and "PARTITA_ADMIN_ACCESS=true" in env
        assert node.violations(work, dcgm) == []
        assert (await node.call("NodeUnprepareResources", dcgm)).error == ""
        assert node.violations(work) == []                    # the owner's instance is intact
        assert (await node.call("NodeUnprepareResources", work)).error == ""
        assert node.violations() == []
    _scenario(body)


def test_a_non_utf8_checkpoint_does_not_crash_the_plugin() -> None:
    async def body(node: Node) -> None:
        await node.start()
        node.plugin.stop()
        cp = node.plugin_dir / "checkpoint.json"
        cp.write_bytes(b'{"apiVersion": "gpu.partita.dev/v1", "kind": "PluginCheckpoint", "claims": {"\xff": {}}}')
        await node.start()                                  # used to exit at start: a crash loop
        claim = node.mig_claim("mig-3g", "3g.40gb", 4)
        err = (await node.call("NodePrepareResources", claim)).error
        assert "not UTF-8" in err and str(cp) in err
        assert node.plugin.alive()
    _scenario(body)
