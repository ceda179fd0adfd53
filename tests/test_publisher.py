"""The publisher keeps this node's pool on the API server equal to the device model."""

from __future__ import annotations

import asyncio

import pytest

from controller.sandbox.apiserver import ApiServer
from driver.api import constants as C
from driver.api.kube import Kube
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.publisher import SlicePublisher
from driver.slices import SliceFeatures

NODE = "node-a"


def _inventory(spec="H100-SXM5-80GB:2"):
    b = open_backend("fake", profile=profile_from_spec(spec, NODE), node_name=NODE)
    b.init()
    return discover(b, NODE)


def _ours(server):
    return [s for s in server.list("resourceslices")
            if s["spec"]["driver"] == C.DEFAULT_DRIVER_NAME and s["spec"]["nodeName"] == NODE]


def _run(scenario, drop=()):
    async def main():
        server = ApiServer(bookmark_interval=0.5)
        await server.start()
        server.drop_features(drop)
        node = server.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        kube = await Kube.connect(server.url)
        stop = asyncio.Event()
        try:
            await scenario(server, kube, stop, node)
        finally:
            stop.set()
            await kube.close()
            await server.stop()
    asyncio.run(main())


def _start(kube, stop, inv=None, **kw):
    pub = SlicePublisher(kube, driver_name=C.DEFAULT_DRIVER_NAME, node_name=NODE, inventory=inv or _inventory(),
                         react_seconds=0.05, **kw)
    return pub, asyncio.create_task(pub.run(stop))


def test_publishes_removes_stale_and_leaves_others_alone() -> None:
    async def scenario(server, kube, stop, node):
        stale = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": "old-slice"},
                 "spec": {"driver": C.DEFAULT_DRIVER_NAME, "nodeName": NODE, "devices": [],
                          "pool": {"name": NODE, "generation": 5, "resourceSliceCount": 1}}}
        other_driver = {**stale, "metadata": {"name": "net"}, "spec": {**stale["spec"], "driver": "net.example.com"}}
        other_node = {**stale, "metadata": {"name": "b"}, "spec": {**stale["spec"], "nodeName": "node-b"}}
        for s in (stale, other_driver, other_node):
            server.create(s)
        pub, task = _start(kube, stop)
        await server.wait_for(lambda s: pub.in_sync, 10)
        ours = _ours(server)
        assert "old-slice" not in [s["metadata"]["name"] for s in ours]
        assert {s["spec"]["pool"]["generation"] for s in ours} == {6}   # above every stale generation
        assert all(s["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"] for s in ours)
        assert server.get("resourceslices", "net") and server.get("resourceslices", "b")
        stop.set()
        await task
        assert len(_ours(server)) == len(ours)          # stopping never deletes slices
    _run(scenario)


def test_recreates_deleted_slices_within_seconds_and_bumps_generation_on_change() -> None:
    async def scenario(server, kube, stop, node):
        pub, task = _start(kube, stop)
        await server.wait_for(lambda s: pub.in_sync, 10)
        count = len(_ours(server))
        # the kubelet wipes the node's slices
        for s in _ours(server):
            server.delete("resourceslices", s["metadata"]["name"])
        await server.wait_for(lambda s: len(_ours(s)) == count, 3)
        gen = {s["spec"]["pool"]["generation"] for s in _ours(server)}
        pub.update_inventory(_inventory("H100-SXM5-80GB:3"))

        def consistent(s):
            ours = _ours(s)
            gens = {x["spec"]["pool"]["generation"] for x in ours}
            return (len(gens) == 1 and max(gens) > max(gen) and
                    {x["spec"]["pool"]["resourceSliceCount"] for x in ours} == {len(ours)})
        await server.wait_for(consistent, 5)
        slices = _ours(server)
        assert {s["spec"]["pool"]["resourceSliceCount"] for s in slices} == {len(slices)}
        devices = [d for s in slices for d in s["spec"].get("devices") or []]
        assert sum(d["attributes"]["type"]["string"] == "gpu" for d in devices) == 3
        stop.set()
        await task
    _run(scenario)


def test_survives_api_errors_and_conflicts() -> None:
    async def scenario(server, kube, stop, node):
        server.inject_fault("resourceslices", "list", 503, count=3)
        server.inject_fault("resourceslices", "create", 409, count=1)
        pub, task = _start(kube, stop, max_backoff=0.5)
        await server.wait_for(lambda s: pub.in_sync, 15)
        assert len(_ours(server)) >= 2
        stop.set()
        await task
    _run(scenario)


@pytest.mark.parametrize("gate,check", [
    ("DRADeviceTaints", lambda pub, devices, slices: (
        not pub.features.taints and not any("taints" in d for d in devices)
        and {s["metadata"]["labels"][C.SLICE_ALLOCATION_MODE_LABEL] for s in slices} == {"scheduler"})),
    ("DRAPartitionableDevices", lambda pub, devices, slices: (
        not pub.features.partitionable and not any("sharedCounters" in s["spec"] for s in slices)
        and {d["attributes"]["type"]["string"] for d in devices} == {"gpu"})),
    ("DRAConsumableCapacity", lambda pub, devices, slices: (
        not pub.features.consumable_capacity and pub.features.partitionable
        and "shared" not in {d["attributes"]["type"]["string"] for d in devices})),
])
def test_dropped_fields_degrade_once_and_say_so(gate, check, caplog) -> None:
    async def scenario(server, kube, stop, node):
        pub, task = _start(kube, stop, features=SliceFeatures())
        await server.wait_for(lambda s: pub.in_sync, 10)
        slices = _ours(server)
        devices = [d for s in slices for d in s["spec"].get("devices") or []]
        assert check(pub, devices, slices)
        stop.set()
        await task
    caplog.set_level("WARNING")
    _run(scenario, drop={gate})
    assert sum("the API server dropped" in r.message for r in caplog.records) == 1
