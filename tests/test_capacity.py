"""Cluster capacity (issue 14 item 3): per node and mode GPUs and memory total/allocated/free, pending claims by
reason, fragmentation; the gauges the controller publishes from the same computation."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import REGISTRY

from controller.operator import capacity as cap
from controller.operator.controller import ControllerConfig
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.api.quantity import Quantity
from tests.support.claims import allocated_claim
from tests.support.cluster import claim, cluster, node_slices, pod, request

GI = 2**30
CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
MIG_1G = "device.attributes['gpu.partita.dev'].migProfile == '1g.10gb'"


def devices(slices: list[dict], kind: str) -> list[str]:
    return [d["name"] for s in slices for d in s["spec"].get("devices") or []
            if d["attributes"]["type"]["string"] == kind]


def pending_claim(name: str, *requests: dict, **kw) -> dict:
    c = claim(name, list(requests), **kw)
    c["metadata"]["uid"] = f"uid-{name}"
    return c


def shared_request(memory: str) -> dict:
    return request(cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": memory}})


def compute(slices, claims, pods=()) -> cap.Capacity:
    return cap.compute(slices, claims, list(pods), CLASSES)


def test_whole_and_mig_gpus_and_memory_per_mode() -> None:
    slices = node_slices("node-a", "H100-SXM5-80GB:2")
    gpus = devices(slices, "gpu")
    migs = [d for d in devices(slices, "mig") if d.startswith(gpus[1]) and "-1g10gb-" in d]
    claims = [allocated_claim("w", [gpus[0]]), allocated_claim("m", migs[:2])]
    got = compute(slices, claims).nodes["node-a"]
    gpu_mem = 81559 * 2**20
    whole, mig, shared = got["whole"], got["mig"], got["shared"]
    assert (whole.gpus_total, whole.gpus_allocated, whole.gpus_free) == (2, 1, 0)
    assert (whole.memory_total, whole.memory_allocated, whole.memory_free) == (2 * gpu_mem, gpu_mem, 0)
    assert (mig.gpus_total, mig.gpus_allocated, mig.gpus_free) == (2, 1, 1)
    assert mig.memory_allocated == 2 * 9984 * 2**20
    assert mig.memory_free == gpu_mem - 2 * 9984 * 2**20       # the MIG GPU's unallocated memory
    # both GPUs publish a shared device, but one is whole and one in MIG mode: no share fits
    assert (shared.gpus_total, shared.gpus_allocated, shared.gpus_free, shared.memory_free) == (2, 0, 0, 0)


def test_shares_count_their_consumed_memory_and_block_whole_use() -> None:
    slices = node_slices("node-a", "A100-SXM4-80GB:2")
    shared_dev = devices(slices, "shared")
    uid = "7f0c4bc8-8d0c-4a53-9d55-0e1e6b0d0d0d"
    claims = [allocated_claim("s1", [shared_dev[0]], share_ids={shared_dev[0]: uid}, share_memory="30Gi"),
              allocated_claim("s2", [shared_dev[0]], share_ids={shared_dev[0]: uid.replace("7", "8")},
                              share_memory="20Gi")]
    got = compute(slices, claims).nodes["node-a"]
    assert (got["shared"].gpus_total, got["shared"].gpus_allocated, got["shared"].gpus_free) == (2, 1, 2)
    assert got["shared"].memory_allocated == 50 * GI
    assert got["shared"].memory_free == 30 * GI + 80 * GI
    assert (got["whole"].gpus_free, got["whole"].memory_free) == (1, 80 * GI)


def _fragmented_cluster() -> tuple[list[dict], list[dict]]:
    slices = node_slices("node-a", "A100-SXM4-80GB:2")
    claims = []
    for i, d in enumerate(devices(slices, "shared")):
        claims.append(allocated_claim(f"s{i}", [d], share_ids={d: f"7f0c4bc8-8d0c-4a53-9d55-0e1e6b0d0d0{i}"},
                                      share_memory="30Gi"))
    return slices, claims


def test_pending_reasons_fragmented_insufficient_no_match_invalid_unschedulable() -> None:
    slices, claims = _fragmented_cluster()             # two 80Gi GPUs, 30Gi shared on each: 50Gi free each
    bad_config = [{"opaque": {"driver": C.DEFAULT_DRIVER_NAME,
                              "parameters": {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
                                             "sharing": {"strategy": "Nonsense"}}}}]
    pending = {
        "whole": pending_claim("whole", request()),                               # 100Gi free, no free GPU
        "big-share": pending_claim("big-share", shared_request("60Gi")),          # 50Gi + 50Gi
        "huge-share": pending_claim("huge-share", shared_request("200Gi")),
        "mig": pending_claim("mig", request(cls=C.DEVICE_CLASS_MIG)),             # A100 here publishes no MIG
        "bad": pending_claim("bad", request(), config=bad_config),
        "fits": pending_claim("fits", shared_request("10Gi")),
        "two-of": pending_claim("two-of", shared_request("10Gi"), request(name="w")),   # worst request decides
    }
    pods = [pod(f"p-{n}", [n]) for n in pending]
    got = compute(slices, claims + list(pending.values()), pods)
    reasons = {c.name: c.reason for c in got.pending_claims}
    assert reasons == {"whole": "Fragmented", "big-share": "Fragmented", "huge-share": "InsufficientCapacity",
                       "mig": "NoMatchingDevices", "bad": "InvalidConfig", "fits": "Unschedulable",
                       "two-of": "Fragmented"}
    assert got.pending_by_reason() == {"InvalidConfig": 1, "NoMatchingDevices": 1, "InsufficientCapacity": 1,
                                       "Fragmented": 3, "Unschedulable": 1}
    assert {p.name: p.reason for p in got.pending_pods}["p-two-of"] == "Fragmented"
    # smallest pending whole request (one GPU): both GPUs' free 50Gi is unusable; the smallest pending share
    # (10Gi) fits, so nothing is fragmented for shared use
    node = got.nodes["node-a"]
    assert (node["whole"].fragmented_gpus, node["whole"].fragmented_memory) == (2, 100 * GI)
    assert (node["shared"].fragmented_gpus, node["shared"].fragmented_memory) == (0, 0)


def test_nothing_is_fragmented_for_nobody_and_allocated_or_foreign_claims_are_not_pending() -> None:
    slices, claims = _fragmented_cluster()
    foreign = pending_claim("other", request(cls="other.example.com"))
    running = dict(pod("runs", ["s0"]), spec={**pod("runs", ["s0"])["spec"], "nodeName": "node-a"},
                   status={"phase": "Running"})
    got = compute(slices, claims + [foreign], [pod("p", ["other"]), pod("q", ["s1"]), running])
    assert got.pending_claims == [] and got.pending_pods == []
    assert all(mc.fragmented_gpus == 0 and mc.fragmented_memory == 0 for mc in got.nodes["node-a"].values())


def test_mig_placements_taken_make_larger_profiles_fragmented() -> None:
    slices = node_slices("node-a", "H100-SXM5-80GB:1")
    migs = devices(slices, "mig")
    # one 1g device on every other memory slice (0, 2, 4, 6): 4 slices free, but no two adjacent
    taken = [d for d in migs if re.search(r"-mig-1g10gb-[0246]$", d)]
    assert len(taken) == 4
    want_2g = "device.attributes['gpu.partita.dev'].migProfile == '2g.20gb'"
    two = pending_claim("two", request(cls=C.DEVICE_CLASS_MIG, selectors=[want_2g]))
    got = compute(slices, [allocated_claim("m", taken), two], [pod("p", ["two"])])
    assert [c.reason for c in got.pending_claims] == ["Fragmented"]
    mig = got.nodes["node-a"]["mig"]
    assert mig.gpus_free == 1                  # a 1g placement is still possible
    assert mig.fragmented_gpus == 1 and mig.fragmented_memory > 0
    # the one pending request asks a 1g instead: it fits, nothing is fragmented
    got = compute(slices, [allocated_claim("m", taken), pending_claim("one", request(cls=C.DEVICE_CLASS_MIG,
                                                                                      selectors=[MIG_1G]))],
                  [pod("p", ["one"])])
    assert [c.reason for c in got.pending_claims] == ["Unschedulable"]
    assert got.nodes["node-a"]["mig"].fragmented_gpus == 0


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_gauges_show_the_computation_and_drop_nodes_that_left() -> None:
    slices, claims = _fragmented_cluster()
    slices += node_slices("node-b", "L4:1")
    pods = [pod("p", ["whole"])]
    claims = claims + [pending_claim("whole", request())]
    gauges = cap.CapacityGauges(C.DEFAULT_DRIVER_NAME, min_interval=60)
    got = gauges.refresh(slices, claims, pods, CLASSES, now=1000.0)
    assert got is not None
    for node, per in got.nodes.items():
        for mode, mc in per.items():
            for st in cap.STATES:
                assert _sample("partita_capacity_gpus", node=node, mode=mode, state=st) == mc.gpus(st)
                assert _sample("partita_capacity_memory_bytes", node=node, mode=mode, state=st) == mc.memory(st)
            assert _sample("partita_capacity_fragmented_gpus", node=node, mode=mode) == mc.fragmented_gpus
    # whole request: node-b's L4 (24Gi) is free: it fits there, so the claim is only Unschedulable
    assert _sample("partita_pending_claims_by_reason", reason="Unschedulable") == 1
    assert _sample("partita_pending_claims_by_reason", reason="Fragmented") == 0
    assert gauges.refresh(slices[:-2], claims, pods, CLASSES, now=1030.0) is None      # bounded rate
    assert gauges.refresh([s for s in slices if s["spec"]["nodeName"] == "node-a"], claims, pods, CLASSES,
                          now=1061.0) is not None
    assert _sample("partita_capacity_gpus", node="node-b", mode="whole", state="total") is None
    assert _sample("partita_pending_claims_by_reason", reason="Fragmented") == 1


@pytest.mark.timeout(60)
def test_the_controller_publishes_capacity_from_its_cache() -> None:
    async def main() -> None:
        cfg = ControllerConfig(retry_min=0.2, retry_max=2.0, capacity_refresh_seconds=0.2)
        async with cluster(cfg) as cl:
            cl.add_node("node-c", "L4:2")
            cl.submit(pod("run", ["c1"]), claim("c1", [request()]))
            await cl.allocated("c1")
            cl.submit(pod("wait", ["c2"]), claim("c2", [request(count=3)]))

            def seen(_: object) -> bool:
                return (_sample("partita_capacity_gpus", node="node-c", mode="whole", state="allocated") == 1
                        and _sample("partita_capacity_gpus", node="node-c", mode="whole", state="free") == 1
                        and _sample("partita_pending_claims_by_reason", reason="InsufficientCapacity") == 1)
            await cl.server.wait_for(lambda s: seen(s) or None, 15)
    asyncio.run(main())


def test_selectors_reading_per_device_attributes_match_only_that_device() -> None:
    # devices alike in what a selector reads are matched once; a selector on the UUID tells every GPU apart
    slices = node_slices("node-a", "A100-SXM4-80GB:2")
    whole = [d for s in slices for d in s["spec"].get("devices") or [] if d["attributes"]["type"]["string"] == "gpu"]
    busy = next(d["name"] for s in slices for d in s["spec"].get("devices") or []
                if d["attributes"].get("parentUUID", {}).get("string") == whole[0]["attributes"]["uuid"]["string"])
    claims = [allocated_claim("s", [busy], share_ids={busy: "7f0c4bc8-8d0c-4a53-9d55-0e1e6b0d0d0d"})]
    by_uuid = "device.attributes['gpu.partita.dev'].uuid == '{}'"
    on_busy = pending_claim("on-busy", request(selectors=[by_uuid.format(whole[0]["attributes"]["uuid"]["string"])]))
    on_free = pending_claim("on-free", request(selectors=[by_uuid.format(whole[1]["attributes"]["uuid"]["string"])]))
    got = compute(slices, claims + [on_busy, on_free], [pod("a", ["on-busy"]), pod("b", ["on-free"])])
    # the busy GPU has 70Gi free: not enough for a whole GPU (80Gi), so not fragmentation either
    assert {c.name: c.reason for c in got.pending_claims} == {"on-busy": "InsufficientCapacity",
                                                              "on-free": "Unschedulable"}


def test_a_tainted_device_is_published_but_not_free() -> None:
    slices = node_slices("node-a", "L4:2")
    gpu = next(d for s in slices for d in s["spec"].get("devices") or [] if d["attributes"]["type"]["string"] == "gpu")
    gpu.setdefault("taints", []).append({"key": "partita.dev/unhealthy", "value": "xid-79", "effect": "NoExecute"})
    got = compute(slices, []).nodes["node-a"]["whole"]
    assert (got.gpus_total, got.gpus_free, got.memory_free) == (2, 1, 23034 * 2**20)
    # two whole GPUs wanted: one is free, the other's memory is no use while it is tainted (not fragmentation)
    got = compute(slices, [pending_claim("two", request(count=2))], [pod("p", ["two"])])
    assert [c.reason for c in got.pending_claims] == ["InsufficientCapacity"]
    assert got.nodes["node-a"]["whole"].fragmented_gpus == 0


def test_static_mig_gpus_are_known_by_their_mig_devices() -> None:
    from driver.inventory import discover
    from driver.nvml import open_backend
    from driver.nvml.interface import Placement
    from driver.nvml.profile import parse_profile
    from driver.slices import SliceFeatures, build_slices

    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "node-a", "gpus": [{"model": "A100-SXM4-40GB", "count": 1, "migEnabled": True}]}]})
    backend = open_backend("fake", profile=profile, node_name="node-a")
    backend.init()
    backend.create_mig_device(0, 9, Placement(0, 4))                  # one 3g.20gb instance
    backend.create_mig_device(0, 14, Placement(4, 2))                 # one 2g.10gb instance
    slices = build_slices(discover(backend, "node-a"), features=SliceFeatures(True, False, True))
    migs = devices(slices, "mig")
    assert len(migs) == 2 and devices(slices, "gpu") == []
    got = compute(slices, [allocated_claim("m", migs[:1])]).nodes["node-a"]
    assert (got["mig"].gpus_total, got["mig"].gpus_allocated, got["mig"].gpus_free) == (1, 1, 1)
    assert got["mig"].memory_total == sum(
        Quantity.parse(d["capacity"]["memory"]["value"]).as_int() for s in slices for d in s["spec"]["devices"])
    assert got["whole"].gpus_total == 0
