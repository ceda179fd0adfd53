"""Seamless plugin upgrades (issue: Day-2 operations): per-instance socket names, two real plugin processes
on one node directory during a surge rollout, and the sandbox kubelet stand-in following the newest one."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from controller.sandbox.apiserver import ApiServer
from controller.sandbox.kubelet import Kubelet
from controller.sandbox.plugin import PluginProcess
from driver.api import naming
from driver.inventory import discover
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.nvml import open_backend, profile_from_spec
from driver.plugin import main as plugin_main
from driver.plugin.health import check_sockets
from driver.plugin.server import DraService, PluginServers
from driver.plugin.sockets import (InstanceUidError, kubelet_supports_instances, registration_sockets,
                                   socket_paths)
from tests.support.claims import allocated_claim
from tests.support.node_check import check_node

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:1", NODE)
UID_OLD = "0b7c6a44-1111-4a0e-9d55-000000000001"
UID_NEW = "0b7c6a44-2222-4a0e-9d55-000000000002"


# -- naming -------------------------------------------------------------------------------------------
def test_per_instance_socket_names_follow_the_kubeletplugin_rule(tmp_path) -> None:
    """k8s.io/dynamic-resource-allocation kubeletplugin RollingUpdate: <driver>-<uid>-reg.sock, dra-<uid>.sock."""
    fixed = socket_paths(DRIVER, tmp_path / "reg", tmp_path / "plugins" / DRIVER)
    assert (fixed.registration.name, fixed.dra.name) == (f"{DRIVER}-reg.sock", "dra.sock")
    mine = socket_paths(DRIVER, tmp_path / "reg", tmp_path / "plugins" / DRIVER, UID_NEW)
    assert mine.registration == tmp_path / "reg" / f"{DRIVER}-{UID_NEW}-reg.sock"
    assert mine.dra == tmp_path / "plugins" / DRIVER / f"dra-{UID_NEW}.sock"
    with pytest.raises(InstanceUidError, match="metadata.uid"):
        socket_paths(DRIVER, tmp_path, tmp_path, "../../etc")
    for name in (f"{DRIVER}-reg.sock", f"{DRIVER}-{UID_OLD}-reg.sock", "other.dev-reg.sock", f"{DRIVER}x-reg.sock"):
        (tmp_path / name).touch()
    assert [p.name for p in registration_sockets(tmp_path, DRIVER)] == [f"{DRIVER}-{UID_OLD}-reg.sock",
                                                                         f"{DRIVER}-reg.sock"]


@pytest.mark.parametrize(("version", "supported"), [("v1.33.0", True), ("v1.34.2-gke.100", True), ("v2.0.0", True),
                                                      ("v1.32.9", False), ("v1.28.0+k3s1", False), ("", None),
                                                      ("garbage", None)])
def test_per_instance_names_need_kubelet_1_33(version: str, supported: bool | None) -> None:
    assert kubelet_supports_instances(version) is supported


class _Kube:
    def __init__(self, version: str | None):
        self.version = version

    async def get(self, path: str) -> dict:
        if self.version is None:
            raise OSError("connection refused")
        return {"status": {"nodeInfo": {"kubeletVersion": self.version}}}


def _args(tmp_path: Path, mode: str, uid: str) -> argparse.Namespace:
    return argparse.Namespace(rolling_update=mode, instance_uid=uid, node_name=NODE, driver_name=DRIVER,
                              kubelet_registrar_directory_path=str(tmp_path / "reg"))


@pytest.mark.parametrize(("mode", "uid", "kubelet", "unique"), [
    ("auto", UID_NEW, "v1.33.1", True),      # the chart's default on a 1.33+ node
    ("auto", UID_NEW, "v1.32.4", False),     # older kubelet: fixed names
    ("auto", UID_NEW, None, False),          # unknown: fixed names
    ("auto", "", "v1.34.0", False),          # no uid to name sockets with
    ("on", UID_NEW, None, True),             # the operator asserts the kubelet is new enough
    ("off", UID_NEW, "v1.34.0", False)])
def test_rolling_update_mode_chooses_socket_names(tmp_path, mode, uid, kubelet, unique) -> None:
    paths = asyncio.run(plugin_main.choose_sockets(_args(tmp_path, mode, uid), _Kube(kubelet), tmp_path / DRIVER))
    assert (paths.instance_uid == uid and paths.dra.name == f"dra-{uid}.sock") if unique else \
        (paths.dra.name, paths.instance_uid) == ("dra.sock", "")


def test_rolling_update_on_refuses_an_old_kubelet_naming_the_fix(tmp_path) -> None:
    with pytest.raises(plugin_main.StartupError, match=r"v1\.32\.4.*kubelet 1\.33\+.*uniqueSockets=false"):
        asyncio.run(plugin_main.choose_sockets(_args(tmp_path, "on", UID_NEW), _Kube("v1.32.4"), tmp_path / DRIVER))


def test_rolling_update_on_without_a_uid_is_a_clear_usage_error(capsys) -> None:
    p = argparse.ArgumentParser()
    plugin_main.add_arguments(p)
    assert plugin_main.run(p.parse_args(["--node-name", NODE, "--rolling-update", "on", "--instance-uid", ""])) == 2
    assert "--rolling-update on needs --instance-uid (env POD_UID" in capsys.readouterr().err


def test_an_instance_that_stops_leaves_the_sockets_a_newer_one_replaced(tmp_path) -> None:
    """Fixed names (a kubelet older than 1.33, or --rolling-update off) with two pods on a node: the old
    instance's stop used to unlink the sockets the new instance had bound in their place, so the kubelet
    deregistered the new, only remaining plugin."""
    paths = socket_paths(DRIVER, tmp_path / "reg", tmp_path / "plugins" / DRIVER)

    class NoClaims:          # the health check's empty prepare is all these servers answer
        prepared_count = 0

        async def prepare(self, items: list) -> dict:
            return {}

    async def scenario() -> None:
        old = PluginServers(DraService(NoClaims(), None), driver_name=DRIVER, dra_socket=paths.dra, registration_socket=paths.registration)
        new = PluginServers(DraService(NoClaims(), None), driver_name=DRIVER, dra_socket=paths.dra, registration_socket=paths.registration)
        await old.start()
        await new.start()           # replaces both files, as a surge pod with fixed names does
        try:
            await old.stop(0)
            assert paths.dra.exists() and paths.registration.exists()
            assert await check_sockets(paths.dra, paths.registration) == ""      # still the new instance's
        finally:
            await new.stop(0)
        assert not paths.dra.exists() and not paths.registration.exists()    # its own: removed
    asyncio.run(scenario())


class _Recorder:
    """A DeviceState stand-in that records which instance answered."""
    prepared_count = 0

    def __init__(self) -> None:
        self.calls = 0

    async def prepare(self, items: list) -> dict:
        self.calls += 1
        return {}


def test_the_kubelet_stand_in_calls_the_newest_connected_instance() -> None:
    """As pkg/kubelet/cm/dra/plugin DRAPluginManager: instances kept in registration order, the newest
    one that accepts connections is called, one whose registration socket is gone is deregistered (by
    endpoint), and an endpoint that is already registered is refused."""
    tmp_path = Path(tempfile.mkdtemp(prefix="kst-", dir="/tmp"))     # short: unix socket paths
    reg, pdir = tmp_path / "reg", tmp_path / "plugins" / DRIVER

    def instance(uid: str) -> tuple[PluginServers, _Recorder]:
        rec = _Recorder()
        paths = socket_paths(DRIVER, reg, pdir, uid)
        return PluginServers(DraService(rec, None), driver_name=DRIVER, dra_socket=paths.dra,
                             registration_socket=paths.registration), rec

    async def scenario() -> None:
        (old, old_rec), (new, new_rec) = instance(UID_OLD), instance(UID_NEW)
        kubelet = Kubelet(None, NODE, reg, DRIVER)
        await old.start()
        try:
            await kubelet.register()
            await kubelet._call("NodePrepareResources", v1.NodePrepareResourcesRequest())
            assert (old_rec.calls, new_rec.calls) == (1, 0)
            await new.start()
            await kubelet._call("NodePrepareResources", v1.NodePrepareResourcesRequest())   # finds and registers it
            assert (old_rec.calls, new_rec.calls) == (1, 1)
            assert [i.endpoint for i in kubelet.instances] == [str(old.dra_socket), str(new.dra_socket)]
            # the new one is not reachable (killed: its files stay): the old one, still connected, answers
            await new._dra.stop(0)
            new.dra_socket.touch()
            await kubelet._call("NodePrepareResources", v1.NodePrepareResourcesRequest())
            assert (old_rec.calls, new_rec.calls) == (2, 1)
            # a third registration socket naming an endpoint already registered is refused
            impostor = PluginServers(DraService(_Recorder(), None), driver_name=DRIVER, dra_socket=tmp_path / "x.sock",
                                     registration_socket=reg / f"{DRIVER}-impostor-reg.sock")
            impostor.registration.endpoint = str(old.dra_socket)
            await impostor.start()
            with pytest.raises(RuntimeError, match="already registered"):
                await kubelet.register()
            await impostor.stop(0)
            # the old one stops: deregistered by its endpoint only
            await old.stop(0)
            await kubelet.register()
            assert [i.endpoint for i in kubelet.instances] == [str(new.dra_socket)]
        finally:
            await old.stop(0)
            await new.stop(0)
    try:
        asyncio.run(scenario())
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# -- two real instances on one node -------------------------------------------------------------------
class Node:
    def __init__(self, root: Path, server: ApiServer, url: str):
        self.root, self.server, self.url = root, server, url
        self.plugins: dict[str, PluginProcess] = {}

    async def start(self, uid: str) -> PluginProcess:
        p = PluginProcess(PROFILE, PROFILE.nodes[0], self.root, self.url, DRIVER, "DEBUG", instance_uid=uid)
        self.plugins[uid] = p
        p.start()
        await p.wait_ready()
        return p

    @property
    def paths(self):  # noqa: ANN201
        return next(iter(self.plugins.values())).paths

    def dra_socket(self, uid: str) -> Path:
        return socket_paths(DRIVER, self.paths.registry, self.paths.plugin_dir(DRIVER), uid).dra

    def mig_claim(self, name: str, profile: str, start: int) -> dict:
        backend = open_backend("fake", profile=PROFILE, node_name=NODE,
                               state_dir=self.paths.plugin_dir(DRIVER) / "fake-nvml")
        backend.init()
        device = naming.mig_device_name(naming.gpu_device_name(discover(backend, NODE).gpus[0].uuid), profile, start)
        return self.server.create(allocated_claim(name, [device]))

    async def call(self, uid: str, method: str, claim: dict):  # noqa: ANN201
        md = claim["metadata"]
        req_type = v1.NodePrepareResourcesRequest if method == "NodePrepareResources" else v1.NodeUnprepareResourcesRequest
        req = req_type(claims=[v1.Claim(namespace=md["namespace"], name=md["name"], uid=md["uid"])])
        async with grpc.aio.insecure_channel(f"unix://{self.dra_socket(uid)}",
                                             options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            resp = await getattr(v1_grpc.DRAPluginStub(ch), method)(req, timeout=30)
        return resp.claims[md["uid"]]

    def violations(self, *prepared: dict) -> list[str]:
        return check_node(plugin_dir=self.paths.plugin_dir(DRIVER), cdi_dir=self.paths.cdi, profile=PROFILE,
                          node_name=NODE, expected_uids={c["metadata"]["uid"] for c in prepared})


def _scenario(body) -> None:  # noqa: ANN001
    async def main() -> None:
        root = Path(tempfile.mkdtemp(prefix="upg-", dir="/tmp"))     # short: unix socket paths
        server = ApiServer()
        url = await server.start()
        node = Node(root, server, url)
        try:
            await body(node)
        finally:
            for p in node.plugins.values():
                p.stop()
            await server.stop()
            shutil.rmtree(root, ignore_errors=True)
    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_instances_on_one_node_serve_side_by_side_without_corrupting_each_other() -> None:
    """A surge rollout: the new pod starts while the old one serves. Both instances prepare through their
    own sockets at the same time on the same checkpoint, GPUs and CDI directory; the node stays consistent,
    a MIG device prepared twice is refused across instances, the kubelet (stand-in) moves to the newest
    instance, and the old one's exit removes only its own sockets."""
    async def body(node: Node) -> None:
        old = await node.start(UID_OLD)
        kubelet = Kubelet(node.server, NODE, old.paths.registry, DRIVER)
        await kubelet.register()
        assert kubelet.endpoint == str(node.dra_socket(UID_OLD))
        new = await node.start(UID_NEW)
        assert old.alive() and node.dra_socket(UID_OLD).exists()      # the new one did not take its sockets
        await kubelet.register()
        assert [i.endpoint for i in kubelet.instances] == [str(node.dra_socket(UID_OLD)), str(node.dra_socket(UID_NEW))]
        assert kubelet.endpoint == str(node.dra_socket(UID_NEW))

        a = node.mig_claim("mig-a", "3g.40gb", 4)          # through the old instance
        b = node.mig_claim("mig-b", "3g.40gb", 0)          # through the new one, at the same time
        twin = node.mig_claim("mig-twin", "3g.40gb", 0)    # b's device again, through the old one: one must lose
        ra, rb, rtwin = await asyncio.gather(node.call(UID_OLD, "NodePrepareResources", a),
                                             node.call(UID_NEW, "NodePrepareResources", b),
                                             node.call(UID_OLD, "NodePrepareResources", twin))
        assert ra.error == ""
        assert (rb.error == "") != (rtwin.error == ""), (rb.error, rtwin.error)
        assert "already prepared" in (rb.error or rtwin.error)
        prepared = [a, b] if rb.error == "" else [a, twin]
        assert node.violations(*prepared) == []
        # each instance sees what the other prepared: a repeat is idempotent on the other socket
        again = await node.call(UID_NEW, "NodePrepareResources", a)
        assert (again.error, list(again.devices[0].cdi_device_ids)) == ("", list(ra.devices[0].cdi_device_ids))

        assert old.stop() == 0                               # the old pod goes after the new one is ready
        assert not node.dra_socket(UID_OLD).exists() and node.dra_socket(UID_NEW).exists()
        assert registration_sockets(old.paths.registry, DRIVER) == [new.paths.registration_socket(DRIVER, UID_NEW)]
        await kubelet.register()
        assert [i.endpoint for i in kubelet.instances] == [str(node.dra_socket(UID_NEW))]
        # the new instance unprepares what the old one prepared
        for c in prepared:
            assert (await node.call(UID_NEW, "NodeUnprepareResources", c)).error == ""
        assert node.violations() == []
    _scenario(body)
