"""The published device model: valid for Kubernetes 1.34-1.37, within upstream limits, and with
counters that conflict exactly where the hardware does."""

from __future__ import annotations

import itertools

import kubernetes_validate
import pytest

from driver.api import constants as C
from driver.api.quantity import Quantity
from driver.inventory import discover
from driver.limits import validate_pool
from driver.nvml import errors, open_backend, profile_from_spec
from driver.nvml.interface import Placement
from driver.nvml.profile import parse_profile
from driver.slices import SliceFeatures, build_slices, gpu_devices, semver

MODELS = ["A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB", "H200-SXM-141GB", "L4", "T4"]
MIG_MODELS = MODELS[:4]
VERSIONS = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]
FEATURES = [SliceFeatures(t, p, c) for t, p, c in itertools.product([True, False], repeat=3)]


def _inventory(spec: str, node: str = "node-a", mig: bool = False):
    if mig:
        groups = [{"model": m, "count": int(n), "migEnabled": True} for m, n in (x.split(":") for x in spec.split(","))]
        profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                                 "nodes": [{"name": node, "gpus": groups}]})
    else:
        profile = profile_from_spec(spec, node)
    b = open_backend("fake", profile=profile, node_name=node)
    b.init()
    return discover(b, node), b


def _devices(slices):
    return [d for s in slices for d in s["spec"].get("devices") or []]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("features", FEATURES, ids=lambda f: f"t{int(f.taints)}p{int(f.partitionable)}c{int(f.consumable_capacity)}")
def test_slices_validate_against_kubernetes_schemas_and_limits(model, features) -> None:
    inv, _ = _inventory(f"{model}:2")
    slices = build_slices(inv, node_uid="0b1c", features=features)
    assert validate_pool(slices) == []
    for s in slices:
        for v in VERSIONS:
            kubernetes_validate.validate(s, v, strict=True)


def test_ampere_with_mig_on_validates_too() -> None:
    inv, _ = _inventory("A100-SXM4-80GB:2", mig=True)
    for f in FEATURES:
        slices = build_slices(inv, node_uid="u", features=f)
        assert validate_pool(slices) == []
        for s in slices:
            kubernetes_validate.validate(s, "1.36.0", strict=True)


def test_pool_shape_names_owner_and_labels() -> None:
    inv, _ = _inventory("H100-SXM5-80GB:1")
    slices = build_slices(inv, driver_name="gpu.example.org", node_uid="uid-1", generation=7)
    assert [s["metadata"]["name"] for s in slices] == ["node-a-gpu.example.org-0", "node-a-gpu.example.org-1"]
    for s in slices:
        spec = s["spec"]
        assert spec["driver"] == "gpu.example.org" and spec["nodeName"] == "node-a"
        assert spec["pool"] == {"name": "node-a", "generation": 7, "resourceSliceCount": 2}
        assert s["metadata"]["ownerReferences"] == [
            {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "uid-1", "controller": True}]
        assert s["metadata"]["labels"] == {C.SLICE_NODE_LABEL: "node-a", C.SLICE_ALLOCATION_MODE_LABEL: "controller"}
    assert "sharedCounters" in slices[0]["spec"] and "devices" not in slices[0]["spec"]


def test_whole_gpu_attributes_and_capacity() -> None:
    inv, _ = _inventory("H100-SXM5-80GB:1")
    gpu = inv.gpus[0]
    whole = next(d for d in _devices(build_slices(inv)) if d["attributes"]["type"]["string"] == "gpu")
    a = whole["attributes"]
    assert whole["name"] == "gpu-" + gpu.uuid[4:12]
    assert a["uuid"] == {"string": gpu.uuid}
    assert a["productName"] == {"string": "NVIDIA H100 80GB HBM3"}
    assert a["cudaComputeCapability"] == {"version": "9.0.0"}
    assert a["driverVersion"] == {"version": "580.105.8"}
    assert a["cudaDriverVersion"] == {"version": "13.0.0"}
    assert a["resource.kubernetes.io/pciBusID"] == {"string": "0000:1b:00.0"}
    assert a["resource.kubernetes.io/pcieRoot"] == {"string": "pci0000:15"}
    assert a["numaNode"] == {"int": 0} and a["brand"] == {"string": "NVIDIA"} and a["migCapable"] == {"bool": True}
    assert Quantity.parse(whole["capacity"]["memory"]["value"]).value == 81559 * 2**20
    assert whole["capacity"]["multiprocessors"] == {"value": "132"}
    assert whole["taints"] == [C.managed_taint()]


def test_names_are_stable_across_discoveries_and_not_index_based() -> None:
    a, _ = _inventory("H100-SXM5-80GB:2")
    b, _ = _inventory("H100-SXM5-80GB:2")
    names_a = [d["name"] for d in _devices(build_slices(a))]
    assert names_a == [d["name"] for d in _devices(build_slices(b))]
    assert len(set(names_a)) == len(names_a)
    assert not any(n in ("gpu-0", "gpu-1") for n in names_a)


def test_full_model_per_h100_and_split_within_64() -> None:
    inv, _ = _inventory("H100-SXM5-80GB:16")
    slices = build_slices(inv)
    counters = [s for s in slices if "sharedCounters" in s["spec"]]
    devs = [s for s in slices if "devices" in s["spec"]]
    assert len(counters) == 2 and all(len(s["spec"]["sharedCounters"]) <= 8 for s in counters)
    assert all(len(s["spec"]["devices"]) <= 64 for s in devs)
    types = [d["attributes"]["type"]["string"] for d in _devices(slices)]
    assert types.count("gpu") == 16 and types.count("mig") == 16 * 25 and types.count("shared") == 16
    # one GPU's devices stay in one slice
    for s in devs:
        parents = {d["attributes"].get("parentUUID", d["attributes"].get("uuid"))["string"] for d in s["spec"]["devices"]}
        assert len(s["spec"]["devices"]) == 27 * len(parents)
    assert validate_pool(slices) == []


def test_no_taints_and_no_counters_allow_128_devices_per_slice() -> None:
    inv, _ = _inventory("T4:64")
    slices = build_slices(inv, features=SliceFeatures(False, False, False))
    assert len(slices) == 1 and len(slices[0]["spec"]["devices"]) == 64
    inv, _ = _inventory("T4:64,L4:64")
    assert [len(s["spec"]["devices"]) for s in build_slices(inv, features=SliceFeatures(False, False, False))] == [128]
    assert [len(s["spec"]["devices"]) for s in build_slices(inv, features=SliceFeatures(True, False, False))] == [64, 64]


def test_empty_node_publishes_one_empty_slice() -> None:
    inv, _ = _inventory("T4:1")
    empty = inv.model_copy(update={"gpus": ()})
    slices = build_slices(empty, node_uid="u")
    assert len(slices) == 1 and slices[0]["spec"]["devices"] == []
    kubernetes_validate.validate(slices[0], "1.34.0", strict=True)


def test_static_mig_when_partitionable_devices_are_off() -> None:
    inv, b = _inventory("A100-SXM4-40GB:2", mig=True)
    dev = b.create_mig_device(0, 9, Placement(0, 4))
    inv = discover(b, "node-a")
    slices = build_slices(inv, features=SliceFeatures(True, False, True))
    devices = _devices(slices)
    assert not any("sharedCounters" in s["spec"] for s in slices)
    assert [(d["name"], d["attributes"]["uuid"]["string"]) for d in devices] == [
        (f"gpu-{inv.gpus[0].uuid[4:12]}-mig-3g20gb-0", dev.uuid)]   # MIG GPUs are not offered whole
    assert not any(d.get("allowMultipleAllocations") for d in devices)


def test_ampere_mig_rules_with_partitionable_devices() -> None:
    off, _ = _inventory("A100-SXM4-80GB:1")
    on, _ = _inventory("A100-SXM4-80GB:1", mig=True)
    types_off = {d["attributes"]["type"]["string"] for d in gpu_devices(off, off.gpus[0], SliceFeatures()).devices}
    types_on = {d["attributes"]["type"]["string"] for d in gpu_devices(on, on.gpus[0], SliceFeatures()).devices}
    assert types_off == {"gpu", "shared"}        # cannot enable MIG without a reset
    assert types_on == {"mig"}                   # cannot leave MIG without a reset


def test_shared_device_policy() -> None:
    inv, _ = _inventory("A100-SXM4-80GB:1")
    shared = next(d for d in _devices(build_slices(inv)) if d.get("allowMultipleAllocations"))
    mem = shared["capacity"]["memory"]
    assert mem["value"] == "80Gi"
    assert mem["requestPolicy"] == {"default": "10Gi", "validRange": {"min": "1Gi", "step": "1Gi"}}
    assert set(shared["capacity"]) == {"memory"}


def test_semver_normalization() -> None:
    assert semver("580.105.08") == "580.105.8"
    assert semver("9.0") == "9.0.0"
    assert semver("13") == "13.0.0"


# -- counters conflict exactly where the hardware (the fake NVML) does ----------------------------------
def _ints(counters: dict) -> dict[str, int]:
    return {k: Quantity.parse(v["value"]).as_int() for k, v in counters.items()}


def _counter_fits(consumptions: list[dict], totals: dict) -> bool:
    used: dict[str, int] = {}
    for c in consumptions:
        for k, v in c.items():
            used[k] = used.get(k, 0) + v
    return all(k in totals and used[k] <= totals[k] for k in used)


@pytest.mark.parametrize("model", MIG_MODELS)
def test_mig_counters_match_hardware_on_every_reachable_configuration(model) -> None:
    """Depth-first over every set of MIG devices the hardware can hold at once: for each such set and
    each further placement, the hardware accepts it exactly when the counters do."""
    mig = model.startswith("A100")   # Ampere offers MIG devices only when MIG is already on
    inv, b = _inventory(f"{model}:1", mig=mig)
    if not mig:
        b.set_mig_mode(0, True)
    gd = gpu_devices(inv, inv.gpus[0], SliceFeatures())
    totals = _ints(gd.counter_set["counters"])
    candidates = [(d["attributes"]["migProfile"]["string"], d["attributes"]["migPlacement"]["int"],
                   _ints(d["consumesCounters"][0]["counters"])) for d in gd.devices if d["attributes"]["type"]["string"] == "mig"]
    ids = {p.name: p.profile_id for p in inv.gpus[0].mig_profiles}
    sizes = {p.name: p.memory_slices for p in inv.gpus[0].mig_profiles}
    checked = 0

    def walk(first: int, chosen: list[int]) -> None:
        nonlocal checked
        for i in range(first, len(candidates)):
            name, start, cons = candidates[i]
            counters_ok = _counter_fits([candidates[j][2] for j in chosen] + [cons], totals)
            try:
                gi = b.create_gpu_instance(0, ids[name], Placement(start, sizes[name]))
                hw_ok = True
            except (errors.InsufficientResourcesError, errors.InvalidArgumentError):
                hw_ok = False
            checked += 1
            assert hw_ok == counters_ok, f"{model}: {[candidates[j][:2] for j in chosen]} + {(name, start)}: hardware {hw_ok}, counters {counters_ok}"
            if hw_ok:
                walk(i + 1, chosen + [i])
                b.destroy_gpu_instance(0, gi)

    walk(0, [])
    assert checked > 1000
    # and the whole GPU conflicts with every MIG device and with the shared device
    whole = next(d for d in gd.devices if d["attributes"]["type"]["string"] in ("gpu",)) if not mig else None
    if whole is not None:
        for _, _, cons in candidates:
            assert not _counter_fits([_ints(whole["consumesCounters"][0]["counters"]), cons], totals)


# -- topology -----------------------------------------------------------------------------------------
def _by_type(slices, kind):
    return [d for d in _devices(slices) if d["attributes"][C.ATTR_TYPE]["string"] == kind]


def test_hgx_h100_publishes_its_fabric_clique_nvlink_domain_numa_and_pcie_root() -> None:
    inv, _ = _inventory("H100-SXM5-80GB:8")
    slices = build_slices(inv)
    whole = _by_type(slices, C.DEVICE_TYPE_GPU)
    assert len(whole) == 8
    cliques = {d["attributes"][C.ATTR_FABRIC_CLIQUE]["string"] for d in whole}
    assert len(cliques) == 1 and next(iter(cliques)).endswith(".1")
    assert {d["attributes"][C.ATTR_NVLINK_DOMAIN]["string"] for d in whole} == {"0000:1b:00.0"}
    assert {d["attributes"][C.ATTR_NVLINK_PEERS]["int"] for d in whole} == {7}
    assert [d["attributes"][C.ATTR_NUMA_NODE]["int"] for d in whole] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({d["attributes"][C.ATTR_PCIE_ROOT]["string"] for d in whole}) == 8
    # shares of a GPU can use its NVLink; MIG devices cannot (no GPU-to-GPU peer access under MIG)
    shared = _by_type(slices, C.DEVICE_TYPE_SHARED)
    assert all(C.ATTR_NVLINK_DOMAIN in d["attributes"] and C.ATTR_FABRIC_CLIQUE in d["attributes"] for d in shared)
    mig = _by_type(slices, C.DEVICE_TYPE_MIG)
    assert mig and not any(C.ATTR_NVLINK_DOMAIN in d["attributes"] or C.ATTR_FABRIC_CLIQUE in d["attributes"]
                           for d in mig)
    assert all(C.ATTR_NUMA_NODE in d["attributes"] and C.ATTR_PCIE_ROOT in d["attributes"] for d in mig)


def test_ampere_hgx_has_nvlink_but_no_fabric_clique_and_pcie_cards_neither() -> None:
    inv, _ = _inventory("A100-SXM4-80GB:4")
    whole = _by_type(build_slices(inv), C.DEVICE_TYPE_GPU)
    assert all(C.ATTR_FABRIC_CLIQUE not in d["attributes"] for d in whole)
    assert {d["attributes"][C.ATTR_NVLINK_PEERS]["int"] for d in whole} == {3}
    inv, _ = _inventory("L4:2")
    whole = _by_type(build_slices(inv), C.DEVICE_TYPE_GPU)
    assert not any(k in d["attributes"] for d in whole for k in (C.ATTR_FABRIC_CLIQUE, C.ATTR_NVLINK_DOMAIN,
                                                                 C.ATTR_NVLINK_PEERS))
    assert {d["attributes"][C.ATTR_PCIE_ROOT]["string"] for d in whole} == {"pci0000:3a"}


def test_nvlink_domains_are_the_connected_sets_of_the_node() -> None:
    inv, _ = _inventory("H100-SXM5-80GB:2,A100-SXM4-80GB:2,L4:1")
    domains = [g.nvlink_domain for g in inv.gpus]
    # the H100 pair and the A100 pair are each one domain; the L4 is in none
    assert domains[0] == domains[1] == inv.gpus[0].pci_bus_id
    assert domains[2] == domains[3] == min(inv.gpus[2].pci_bus_id, inv.gpus[3].pci_bus_id)
    assert domains[0] != domains[2] and domains[4] is None
    assert inv.gpus[0].nvlink_peers == (inv.gpus[1].uuid,) and inv.gpus[4].nvlink_peers == ()


def test_topology_attributes_keep_every_device_within_the_limit() -> None:
    from driver.limits import MAX_ATTRIBUTES_AND_CAPACITIES as LIMIT

    for model in MODELS:
        inv, _ = _inventory(f"{model}:8")
        for d in _devices(build_slices(inv)):
            assert len(d.get("attributes") or {}) + len(d.get("capacity") or {}) <= LIMIT


def test_the_nvlink_pair_example_fits_nvlink_boards_and_not_pcie_cards() -> None:
    """examples/gpu-pair-nvlink-numa.yaml through the allocator, on the slices of real fake nodes."""
    from pathlib import Path

    import yaml

    from controller.allocator import AllocatedState, Allocator, Node, SliceIndex
    from driver.api.deviceclasses import device_classes

    example = Path(__file__).resolve().parents[1] / "examples" / "gpu-pair-nvlink-numa.yaml"
    template = next(d for d in yaml.safe_load_all(example.read_text()) if d["kind"] == "ResourceClaimTemplate")
    claim = {"metadata": {"name": "pair", "namespace": "default", "uid": "u1"}, "spec": template["spec"]["spec"]}
    for r in claim["spec"]["devices"]["requests"]:
        r["exactly"]["tolerations"] = [C.managed_toleration()]
    classes = {c["metadata"]["name"]: c for c in device_classes()}

    def allocate(spec: str):
        inv, _ = _inventory(spec, node="n1")
        index = SliceIndex()
        for s in build_slices(inv):
            index.upsert(s)
        got = Allocator().allocate(Node("n1"), [claim], index, classes, AllocatedState())
        by_name = {d["name"]: d for d in _devices(build_slices(inv))}
        return None if got is None else [by_name[r["device"]] for r in got[0]["devices"]["results"]]

    pair = allocate("H100-SXM5-80GB:8")
    assert pair is not None and len(pair) == 2
    assert len({d["attributes"][C.ATTR_NUMA_NODE]["int"] for d in pair}) == 1
    assert allocate("L4:8") is None
    # one H100 per NUMA node: NVLink connects them, but the NUMA constraint cannot hold
    assert allocate("H100-SXM5-80GB:1,L4:4,H100-SXM5-80GB:1") is None
