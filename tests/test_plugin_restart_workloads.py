"""A plugin restart or upgrade leaves running workloads alone (issue: Day-2 operations): the real plugin
process, stopped as the kubelet stops it (SIGTERM) under prepared MIG, time-sliced and MPS claims, leaves
their CDI specs, MIG instances and MPS control daemon (same PID, still answering) as they were; the next
instance adopts them, and stops the daemon with the last MPS share."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid as uuidlib
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
from driver.plugin.mps import MpsDaemons
from driver.plugin.sockets import socket_paths
from tests.support.claims import allocated_claim
from tests.support.node_check import check_node

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:3", NODE)


def _sharing(strategy: str, **details) -> list[dict]:
    key = "mpsConfig" if strategy == "MPS" else "timeSlicingConfig"
    sharing = {"strategy": strategy, **({key: details} if details else {})}
    return [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": sharing}}}]


class Node:
    def __init__(self, root: Path, server: ApiServer, url: str):
        self.root, self.server, self.url = root, server, url
        self.plugin: PluginProcess | None = None

    async def start(self, uid: str = "", env: dict[str, str] | None = None) -> PluginProcess:
        self.plugin = PluginProcess(PROFILE, PROFILE.nodes[0], self.root, self.url, DRIVER, "DEBUG", instance_uid=uid,
                                    env=env)
        self.plugin.start()
        await self.plugin.wait_ready()
        return self.plugin

    @property
    def plugin_dir(self) -> Path:
        return self.plugin.paths.plugin_dir(DRIVER)

    def backend(self):  # noqa: ANN201
        b = open_backend("fake", profile=PROFILE, node_name=NODE, state_dir=self.plugin_dir / "fake-nvml")
        b.init()
        return b

    def claims(self) -> dict[str, dict]:
        inv = discover(self.backend(), NODE)
        gpu = [naming.gpu_device_name(g.uuid) for g in inv.gpus]
        mig = naming.mig_device_name(gpu[0], "3g.40gb", 4)
        out = {"mig": self.server.create(allocated_claim("mig", [mig]))}
        for name, i, config in (("sliced", 1, _sharing("TimeSlicing", interval="Long")),
                                ("mps-a", 2, _sharing("MPS", defaultActiveThreadPercentage=40)),
                                ("mps-b", 2, _sharing("MPS", defaultActiveThreadPercentage=40))):
            shared = naming.shared_device_name(gpu[i])
            out[name] = self.server.create(allocated_claim(name, [shared], share_ids={shared: str(uuidlib.uuid4())},
                                                           config=config))
        return out

    async def call(self, method: str, claim: dict):  # noqa: ANN201
        md = claim["metadata"]
        req_type = v1.NodePrepareResourcesRequest if method == "NodePrepareResources" else v1.NodeUnprepareResourcesRequest
        req = req_type(claims=[v1.Claim(namespace=md["namespace"], name=md["name"], uid=md["uid"])])
        dra = socket_paths(DRIVER, self.plugin.paths.registry, self.plugin_dir, self.plugin.instance_uid).dra
        async with grpc.aio.insecure_channel(f"unix://{dra}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            resp = await getattr(v1_grpc.DRAPluginStub(ch), method)(req, timeout=30)
        return resp.claims[md["uid"]]

    def workload_view(self) -> dict:
        """What running containers depend on: CDI spec files, MIG instances, GPU settings, the MPS daemon."""
        b = self.backend()
        mps = MpsDaemons(self.plugin_dir / "mps", "fake")
        gpus = [b.device_by_index(i) for i in range(3)]
        mps_gpu = discover(b, NODE).gpus[2].uuid
        return {"cdi": {p.name: p.read_bytes() for p in sorted(self.plugin.paths.cdi.glob("*"))},
                "mig": [(m.uuid, m.profile_name, m.placement) for m in b.mig_devices(gpus[0])],
                "compute_modes": [b.compute_mode(h) for h in gpus],
                "mps_pid": mps.daemon_pid(mps_gpu),
                "mps_answers": mps.running(mps_gpu) and
                mps.control(mps_gpu, "get_default_active_thread_percentage") == "40.0"}

    def violations(self, *prepared: dict) -> list[str]:
        return check_node(plugin_dir=self.plugin_dir, cdi_dir=self.plugin.paths.cdi, profile=PROFILE, node_name=NODE,
                          expected_uids={c["metadata"]["uid"] for c in prepared})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["restart", "surge-upgrade"])
def test_workloads_keep_their_devices_and_mps_daemon_across_a_plugin_restart(how: str) -> None:
    async def body(node: Node) -> None:
        first = await node.start("" if how == "restart" else "0b7c6a44-1111-4a0e-9d55-000000000001")
        claims = node.claims()
        for name, c in claims.items():
            assert (await node.call("NodePrepareResources", c)).error == "", name
        before = node.workload_view()
        assert before["mps_pid"] and _pid_alive(before["mps_pid"]) and before["mps_answers"]
        assert len(before["mig"]) == 1 and len(before["cdi"]) == 4
        assert node.violations(*claims.values()) == []

        if how == "restart":
            assert first.stop() == 0                        # the pod's container is stopped ...
            second = await node.start()                     # ... and started again
        else:
            second = await node.start("0b7c6a44-2222-4a0e-9d55-000000000002")   # the new pod, next to the old
            assert first.stop() == 0                        # then the old one goes
        assert second.alive()
        assert node.workload_view() == before              # untouched: same specs, instances, daemon PID
        assert node.violations(*claims.values()) == []

        # the new instance adopted everything: repeats are idempotent, the last MPS share stops the daemon
        for name, c in claims.items():
            assert (await node.call("NodePrepareResources", c)).error == "", name
        assert node.workload_view() == before
        assert (await node.call("NodeUnprepareResources", claims["mps-a"])).error == ""
        assert _pid_alive(before["mps_pid"]) and node.workload_view()["mps_answers"]     # mps-b still uses it
        for name in ("mps-b", "sliced", "mig"):
            assert (await node.call("NodeUnprepareResources", claims[name])).error == "", name
        for _ in range(200):                                # the stand-in exits right after it answered quit
            if not _pid_alive(before["mps_pid"]):
                break
            await asyncio.sleep(0.02)
        assert not _pid_alive(before["mps_pid"])
        after = node.workload_view()
        assert after["mps_pid"] is None and not after["mps_answers"] and after["mig"] == [] and after["cdi"] == {}
        assert node.violations() == []

    _scenario(body)


def test_an_mps_daemon_that_died_with_a_plugin_container_is_started_again_without_a_prepare() -> None:
    """On a real node the daemon runs in the container of the instance that started it and dies when that
    container stops (a restart, or the old pod of a rollout after the new one adopted the daemon). The
    kubelet prepares nothing again when the clients' containers restart, so the plugin's own check must
    bring the daemon back, with the shares' settings."""
    async def body(node: Node) -> None:
        await node.start(env={"MPS_CHECK_INTERVAL": "0.2"})
        claims = node.claims()
        for name in ("mps-a", "mps-b"):
            assert (await node.call("NodePrepareResources", claims[name])).error == "", name
        pid = node.workload_view()["mps_pid"]
        os.kill(pid, signal.SIGKILL)                      # what stopping its container does to it
        view = node.workload_view()
        for _ in range(300):
            if view["mps_answers"] and view["mps_pid"] not in (None, pid):
                break
            await asyncio.sleep(0.1)
            view = node.workload_view()
        assert view["mps_answers"] and view["mps_pid"] not in (None, pid), view   # 40 %, as the shares ask
        assert node.violations(claims["mps-a"], claims["mps-b"]) == []
        for name in ("mps-a", "mps-b"):
            assert (await node.call("NodeUnprepareResources", claims[name])).error == "", name
        assert node.workload_view()["mps_pid"] is None
    _scenario(body)


def _scenario(body) -> None:  # noqa: ANN001
    async def main() -> None:
        root = Path(tempfile.mkdtemp(prefix="rst-", dir="/tmp"))     # short: unix socket paths
        server = ApiServer()
        url = await server.start()
        node = Node(root, server, url)
        plugins: list[PluginProcess] = []
        orig_start = node.start

        async def tracked(uid: str = "", env: dict[str, str] | None = None) -> PluginProcess:
            p = await orig_start(uid, env)
            plugins.append(p)
            return p
        node.start = tracked
        try:
            await body(node)
        finally:
            for p in plugins:
                p.stop()
            mps = MpsDaemons(root / NODE / "plugins" / DRIVER / "mps", "fake")
            for gpu in mps.running_gpus():              # never leave a stand-in daemon behind
                mps.stop(gpu)
            await server.stop()
            shutil.rmtree(root, ignore_errors=True)
    asyncio.run(main())
