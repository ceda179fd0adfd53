"""DeviceTaintRules merged into device taints as kube-scheduler's slice tracker does (selector by driver,
pool, device, deviceClassName and CEL; no selector = every device), what the allocator then refuses, the
controller's cache re-patching on rule events, NoExecute hits, discovery, and ``partita explain`` naming
the rule."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from controller.allocator import Allocator, AllocatedState, Features, SliceIndex
from controller.allocator.devicetaints import RULE_FIELD, TaintRules, served_version, validate
from controller.operator.taintrules import discover_version
from controller.allocator.types import Node
from controller.cli import main
from controller.operator.cache import Cache
from controller.operator.taintrules import RuleState, noexecute_hits
from controller.sandbox.apiserver import ApiServer
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from tests.support.cluster import node_slices

CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
DRIVER = C.DEFAULT_DRIVER_NAME


def rule(name: str = "maint", effect: str = "NoSchedule", key: str = "example.com/maintenance", value: str = "fw",
         selector: dict | None = None, **taint) -> dict:
    spec: dict = {"taint": {"key": key, "value": value, "effect": effect, **taint}}
    if selector is not None:
        spec["deviceSelector"] = selector
    return {"apiVersion": "resource.k8s.io/v1alpha3", "kind": "DeviceTaintRule", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def two_nodes() -> list[dict]:
    return node_slices("node-a", "H100-SXM5-80GB:2") + node_slices("node-b", "H100-SXM5-80GB:2")


def gpus(slices: list[dict], pool: str) -> list[str]:
    return sorted(d["name"] for s in slices if s["spec"]["pool"]["name"] == pool for d in s["spec"].get("devices") or []
                  if d["attributes"]["type"]["string"] == "gpu")


def tainted(slices: list[dict]) -> dict[str, list[dict]]:
    return {f"{s['spec']['pool']['name']}/{d['name']}": [t for t in d.get("taints") or [] if t.get(RULE_FIELD)]
            for s in slices for d in s["spec"].get("devices") or [] if any(t.get(RULE_FIELD) for t in d.get("taints") or [])}


def test_selector_by_driver_pool_and_device_as_upstream_tracker(two_nodes) -> None:
    a0, a1 = gpus(two_nodes, "node-a")
    one = TaintRules([rule(selector={"driver": DRIVER, "pool": "node-a", "device": a0}, timeAdded="2026-12-01T10:00:00Z")])
    got = tainted(one.patch_all(two_nodes))
    assert list(got) == [f"node-a/{a0}"]
    assert got[f"node-a/{a0}"] == [{"key": "example.com/maintenance", "value": "fw", "effect": "NoSchedule",
                                    "timeAdded": "2026-12-01T10:00:00Z", RULE_FIELD: "maint"}]
    pool = TaintRules([rule(selector={"pool": "node-b"})]).patch_all(two_nodes)
    assert {k.split("/")[0] for k in tainted(pool)} == {"node-b"} and len(tainted(pool)) > 2   # every device of it
    assert tainted(TaintRules([rule(selector={"driver": "other.example.com"})]).patch_all(two_nodes)) == {}
    everything = tainted(TaintRules([rule()]).patch_all(two_nodes))          # no deviceSelector: every device
    assert len(everything) == sum(len(s["spec"].get("devices") or []) for s in two_nodes)
    # the raw slices are not changed; untouched slices are returned as they are
    assert tainted(two_nodes) == {}
    assert all(a is b for a, b in zip(TaintRules([rule(selector={"device": "nope"})]).patch_all(two_nodes), two_nodes))


def test_device_class_and_cel_selectors_of_1_34(two_nodes) -> None:
    a0, _ = gpus(two_nodes, "node-a")
    by_class = TaintRules([rule(selector={"deviceClassName": C.DEVICE_CLASS_MIG})], CLASSES).patch_all(two_nodes)
    assert tainted(by_class) and all("-mig-" in k for k in tainted(by_class))
    missing_class = TaintRules([rule(selector={"deviceClassName": "gone.example.com"})], CLASSES).patch_all(two_nodes)
    assert tainted(missing_class) == {}                       # upstream: the rule applies to nothing meanwhile
    [uuid] = [d["attributes"]["uuid"]["string"] for s in two_nodes for d in s["spec"].get("devices") or [] if d["name"] == a0]
    uuid_sel = f"device.attributes['{DRIVER}'].type == 'gpu' && device.attributes['{DRIVER}'].uuid == '{uuid}'"
    cel = TaintRules([rule(selector={"pool": "node-a", "selectors": [{"cel": {"expression": uuid_sel}}]})]).patch_all(two_nodes)
    assert list(tainted(cel)) == [f"node-a/{a0}"]
    broken = TaintRules([rule(selector={"selectors": [{"cel": {"expression": "device.attributes['x'].nope > 1"}}]})])
    assert tainted(broken.patch_all(two_nodes)) == {}          # a runtime error selects nothing


def test_the_allocator_keeps_off_tainted_devices_unless_tolerated_and_effect_none_is_informational(two_nodes) -> None:
    a0, a1 = gpus(two_nodes, "node-a")

    def allocate(rules: list[dict], tolerations: list[dict] = ()) -> list[str] | None:
        index = SliceIndex.from_slices(TaintRules(rules).patch_all(two_nodes))
        exactly = {"deviceClassName": C.DEVICE_CLASS_GPU, "count": 2, "tolerations": [C.managed_toleration(), *tolerations]}
        claim = {"metadata": {"name": "c", "namespace": "default"},
                 "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}
        got = Allocator(Features()).allocate(Node("node-a"), [claim], index, CLASSES, AllocatedState())
        return None if got is None else sorted(r["device"] for r in got[0]["devices"]["results"])

    on_a0 = {"pool": "node-a", "device": a0}
    assert allocate([]) == [a0, a1]
    assert allocate([rule(selector=on_a0)]) is None
    assert allocate([rule(selector=on_a0, effect="NoExecute")]) is None
    assert allocate([rule(selector=on_a0, effect="None")]) == [a0, a1]
    assert allocate([rule(selector=on_a0)], [{"key": "example.com/maintenance", "operator": "Exists"}]) == [a0, a1]


def test_bad_rules_are_refused_with_the_field_and_fix() -> None:
    assert "spec.taint.effect 'Evict' is not one of NoSchedule, NoExecute, None" in validate(rule(effect="Evict"))
    assert "spec.taint.key is required" in validate(rule(key=""))
    assert "DeviceTaintRule x: spec is missing" in validate({"metadata": {"name": "x"}})
    rules = TaintRules([rule(effect="Evict")])
    assert not rules and "maint" in rules.problems


def test_the_cache_re_patches_its_slices_on_rule_events(two_nodes) -> None:
    a0, _ = gpus(two_nodes, "node-a")
    cache = Cache(DRIVER)
    for s in two_nodes:
        s = json.loads(json.dumps(s))
        s["metadata"]["resourceVersion"] = "7"
        cache.apply("slice", "ADDED", s)

    def taints_of(device: str) -> list[str]:
        [dev] = [d for s in cache.slices.slices() for d in s.devices if d.id.device == device]
        return [t.get(RULE_FIELD) for t in dev.taints if t.get(RULE_FIELD)]

    assert taints_of(a0) == []
    cache.apply("devicetaintrule", "ADDED", rule(selector={"device": a0}))
    assert taints_of(a0) == ["maint"]
    cache.apply("devicetaintrule", "MODIFIED", rule(selector={"device": "something-else"}))
    assert taints_of(a0) == []
    cache.apply("devicetaintrule", "MODIFIED", rule(selector={"device": a0}))
    cache.apply("devicetaintrule", "DELETED", rule(selector={"device": a0}))
    assert taints_of(a0) == []


def test_noexecute_hits_name_untolerated_allocated_devices_and_pending_notes(two_nodes) -> None:
    a0, a1 = gpus(two_nodes, "node-a")
    state = RuleState(CLASSES)
    for s in two_nodes:
        state.track("ADDED", s)
    evict = rule("evict", effect="NoExecute", selector={"pool": "node-a", "device": a0})
    state.on_rule("ADDED", evict)

    def claim(name: str, device: str, tolerations: list[dict] = ()) -> dict:
        result = {"request": "gpu", "driver": DRIVER, "pool": "node-a", "device": device}
        if tolerations:
            result["tolerations"] = list(tolerations)
        return {"metadata": {"name": name, "namespace": "default"},
                "status": {"allocation": {"devices": {"results": [result]}}}}

    claims = [claim("on-a0", a0), claim("on-a1", a1),
              claim("tolerant", a0, [{"key": "example.com/maintenance", "operator": "Exists", "effect": "NoExecute"}]),
              claim("for-a-while", a0, [{"key": "example.com/maintenance", "operator": "Exists", "tolerationSeconds": 300}])]
    hit, later = noexecute_hits(state, evict, claims)
    assert (hit.claim["metadata"]["name"], hit.device, hit.rule, hit.taint) == \
        ("on-a0", f"node-a/{a0}", "evict", "example.com/maintenance=fw:NoExecute")
    assert later.claim["metadata"]["name"] == "for-a-while" and "after 300s (tolerationSeconds)" in later.taint
    assert noexecute_hits(state, rule("soft", selector={"device": a0}), claims) == []   # NoSchedule evicts nobody
    pending = {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": C.DEVICE_CLASS_GPU}}]}}}
    [note] = state.untolerated([pending])
    assert note.startswith("DeviceTaintRule evict taints 1 device(s) example.com/maintenance=fw:NoExecute")
    pending["spec"]["devices"]["requests"][0]["exactly"]["tolerations"] = [{"operator": "Exists"}]
    assert state.untolerated([pending]) == []


def test_discovery_picks_the_served_version() -> None:
    assert served_version({"v1alpha3": ["devicetaintrules"], "v1beta2": ["devicetaintrules", "resourceslices"]}) == "v1beta2"
    assert served_version({"v1": ["resourceslices"]}) is None

    async def discover() -> str | None:
        from driver.api.kube import Kube
        server = ApiServer()
        url = await server.start()
        kube = await Kube.connect(url)
        try:
            return await discover_version(kube)
        finally:
            await kube.close()
            await server.stop()
    assert asyncio.run(discover()) == "v1alpha3"          # the sandbox serves it as 1.33-1.35 do


def test_explain_names_the_rule_from_files_and_from_the_cluster(tmp_path, two_nodes, capsys) -> None:
    a_gpus = gpus(two_nodes, "node-a") + gpus(two_nodes, "node-b")
    (tmp_path / "slices.yaml").write_text(yaml.safe_dump_all(two_nodes))
    claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "four", "namespace": "default"},
             "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": C.DEVICE_CLASS_GPU, "count": 2}}]}}}
    (tmp_path / "claim.yaml").write_text(yaml.safe_dump(claim))
    maint = rule("gpu-maintenance", selector={"driver": DRIVER})
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(maint))
    base = ["explain", "-f", str(tmp_path / "claim.yaml"), "--slices", str(tmp_path / "slices.yaml")]
    assert main(base) == 0 and "fits" in capsys.readouterr().out
    assert main([*base, "--taint-rules", str(tmp_path / "rules.yaml")]) == 1
    out = capsys.readouterr().out
    assert "excluded by taint" in out and "of DeviceTaintRule gpu-maintenance" in out
    assert "note: the taint example.com/maintenance=fw:NoSchedule is set by DeviceTaintRule gpu-maintenance" in out
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(rule("broken", effect="Later")))
    assert main([*base, "--taint-rules", str(tmp_path / "bad.yaml")]) == 2
    assert "DeviceTaintRule broken: spec.taint.effect 'Later'" in capsys.readouterr().err
    # from the cluster: the sandbox's API server serves the rule in v1alpha3
    server = ApiServer()
    url = server.start_in_thread()
    try:
        server.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {}}})
        for c in device_classes():
            server.create(c)
        for s in two_nodes:
            server.create(s)
        server.create(claim)
        server.create(maint)
        assert main(["explain", "--claim", "default/four", "--kube-api", url]) == 1
        assert "of DeviceTaintRule gpu-maintenance" in capsys.readouterr().out
    finally:
        server.stop_in_thread()
    assert len(a_gpus) == 4
