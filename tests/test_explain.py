"""``partita explain``: per-request exclusion counts for every stage, the node verdict, the single fix
(and its alternatives), bad input, and the CLI from files and from an API server."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from controller.allocator import AllocationError
from controller.allocator.explain import ExplainInputError, Explainer, render
from controller.cli import main
from controller.sandbox.apiserver import ApiServer
from driver.api import constants as C
from driver.api import naming
from driver.api.deviceclasses import device_classes
from tests.support.cluster import node_slices

CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
B200 = "device.attributes['gpu.partita.dev'].productName == 'NVIDIA B200'"


def _claim(*requests: dict, constraints: list | None = None, name: str = "c") -> dict:
    devices: dict = {"requests": list(requests)}
    if constraints:
        devices["constraints"] = constraints
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"}, "spec": {"devices": devices}}


def _req(name: str = "gpu", cls: str = C.DEVICE_CLASS_GPU, count: int = 1, selectors: list[str] = (), **extra) -> dict:
    exactly = {"deviceClassName": cls, "count": count, **extra}
    if selectors:
        exactly["selectors"] = [{"cel": {"expression": s}} for s in selectors]
    return {"name": name, "exactly": exactly}


def _allocated(name: str, node: str, *devices: str, share: dict | None = None) -> dict:
    results = [{"request": "gpu", "driver": C.DEFAULT_DRIVER_NAME, "pool": node, "device": d} for d in devices]
    if share:
        results[0].update(share)
    c = _claim(_req(), name=name)
    c["status"] = {"allocation": {"devices": {"results": results}}}
    return c


def _stages(report) -> dict[str, int]:
    return {s.reason: s.excluded for s in report.stages}


def _gpus(slices: list[dict]) -> list[str]:
    return sorted({d["name"] for s in slices for d in s["spec"].get("devices") or []
                   if d["attributes"]["type"]["string"] == "gpu"})


def _n_devices(slices: list[dict]) -> int:
    return sum(len(s["spec"].get("devices") or []) for s in slices)


@pytest.fixture(scope="module")
def h100x2():
    slices = node_slices("node-a", "H100-SXM5-80GB:2")
    return slices, _gpus(slices)


# -- fits ------------------------------------------------------------------------------------------
def test_a_fitting_claim_says_where(h100x2) -> None:
    slices, gpus = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(count=2)))
    assert e.fits and e.node == "node-a" and sorted(e.devices) == [f"node-a/{g}" for g in gpus]
    assert render(e).startswith("claim default/c fits: node node-a, devices node-a/gpu-")


# -- each stage and its fix ----------------------------------------------------------------------------
def test_class_selector_counts_and_a_lower_count_is_the_fix(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(count=3)))
    [r] = e.requests
    assert not e.fits and r.published == _n_devices(slices) and r.candidates == {"node-a": 2}
    assert _stages(r) == {"class selector": r.published - 2}      # MIG and shared devices are not class gpu
    assert all("-mig-" in x or "-shared" in x for x in r.stages[0].examples) and len(r.stages[0].examples) == 3
    assert "needs 3 on one node; the most any node has left is 2 (node-a)" in r.verdict
    assert e.fix == "lower spec.devices.requests[0].exactly.count from 3 to 2"
    assert e.alternatives == []            # not "to 1" as well: one answer per field, the largest that fits


def test_request_selector_and_its_removal(h100x2) -> None:
    slices, gpus = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(selectors=[B200])))
    [r] = e.requests
    assert _stages(r)["request selector"] == 2 and r.candidates == {"node-a": 0}
    assert sorted(r.stages[-1].examples) == [f"node-a/{g}" for g in gpus]
    assert e.fix == f"remove spec.devices.requests[0].exactly.selectors[0] ({B200})"


def test_an_untolerated_taint_is_named_and_the_toleration_suggested(h100x2) -> None:
    slices, gpus = h100x2
    tainted = copy.deepcopy(slices)
    for s in tainted:
        for d in s["spec"].get("devices") or []:
            if d["name"] in gpus:
                d.setdefault("taints", []).append({"key": "example.com/maintenance", "value": "bios",
                                                   "effect": "NoSchedule"})
    e = Explainer(tainted, CLASSES).explain(_claim(_req()))
    [r] = e.requests
    assert _stages(r)["taint"] == 2
    assert e.fix == ('add the toleration {"key": "example.com/maintenance", "operator": "Exists", "effect": '
                     '"NoSchedule"} to spec.devices.requests[0].exactly.tolerations (devices carry the taint '
                     'example.com/maintenance=bios:NoSchedule)')


def test_the_managed_taint_counts_as_kube_scheduler_sees_it_but_is_never_advised(h100x2) -> None:
    slices, _ = h100x2
    [r] = Explainer(slices, CLASSES, managed_toleration=False).explain(_claim(_req())).requests
    assert _stages(r) == {"class selector": r.published - 2, "taint": 2}
    e = Explainer(slices, CLASSES, managed_toleration=False).explain(_claim(_req()))
    assert e.fix is None      # tolerating partita.dev/managed is the controller's business, not the user's
    assert e.notes and e.notes[-1].startswith("devices carry Partita's taint partita.dev/managed")
    assert "\nnote: devices carry Partita's taint" in render(e)


def test_devices_held_by_others_and_counters_used_by_another_mode(h100x2) -> None:
    slices, gpus = h100x2
    held = _allocated("trainer", "node-a", gpus[0])
    mig = _allocated("infer", "node-a", naming.mig_device_name(gpus[1], "1g.10gb", 0))
    e = Explainer(slices, CLASSES, [held, mig]).explain(_claim(_req()))
    [r] = e.requests
    # one whole GPU is held; the other is in MIG use, so its counters are gone
    assert _stages(r)["allocated"] == 1 and _stages(r)["counters"] == 1
    assert r.stages[-2].examples == [f"node-a/{gpus[0]}"] and r.stages[-1].examples == [f"node-a/{gpus[1]}"]
    fixes = [e.fix, *e.alternatives]
    assert f"free node-a/{gpus[0]} held by claim default/trainer (delete that claim, or the pods using it)" in fixes
    assert (f"free node-a/{naming.mig_device_name(gpus[1], '1g.10gb', 0)} held by claim default/infer "
            "(delete that claim, or the pods using it)") in fixes
    assert e.fix.startswith("free ")      # counters/allocated were the last stage: freeing is tried first


def test_the_claims_that_block_are_tried_before_unrelated_ones(h100x2) -> None:
    slices, gpus = h100x2
    elsewhere = [_allocated(f"other{i}", "node-z", f"gpu-{i}") for i in range(30)]   # more than the tries
    held = _allocated("trainer", "node-a", *gpus)
    e = Explainer(slices, CLASSES, [*elsewhere, held]).explain(_claim(_req()))
    assert e.fix == (f"free node-a/{gpus[0]}, node-a/{gpus[1]} held by claim default/trainer "
                     "(delete that claim, or the pods using it)")


def test_shared_capacity_left_and_a_smaller_request(h100x2) -> None:
    slices, gpus = h100x2
    shares = [_allocated(f"nb{i}", "node-a", naming.shared_device_name(g),
                         share={"shareID": f"00000000-0000-0000-0000-00000000000{i}",
                                "consumedCapacity": {"memory": "70Gi"}})
              for i, g in enumerate(gpus)]
    want = _req(cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": "20Gi"}})
    e = Explainer(slices, CLASSES, shares).explain(_claim(want))
    [r] = e.requests
    assert _stages(r)["capacity"] == 2 and r.candidates == {"node-a": 0}
    # the shared device has 81559Mi (79.6Gi); 70Gi are used, so 9Gi is the most in whole GiB
    assert e.fix == ("ask for 9Gi instead of 20Gi in spec.devices.requests[0].exactly.capacity.requests.memory "
                     "(the most any shared device has left)")
    assert any(a.startswith("free node-a/") for a in e.alternatives)


def test_a_match_constraint_counts_the_devices_outside_the_largest_group() -> None:
    slices = node_slices("mixed", "H100-SXM5-80GB:1,L4:1")
    claim = _claim(_req(count=2), constraints=[{"requests": ["gpu"], "matchAttribute": "gpu.partita.dev/productName"}])
    e = Explainer(slices, CLASSES).explain(claim)
    [r] = e.requests
    assert _stages(r)["constraint"] == 1 and r.candidates == {"mixed": 1}
    assert e.fix == "remove spec.devices.constraints[0]"           # constraint was the last stage: tried first
    assert e.alternatives == ["lower spec.devices.requests[0].exactly.count from 2 to 1"]


def test_a_distinct_constraint_and_a_device_lacking_the_attribute(h100x2) -> None:
    slices, _ = h100x2
    claim = _claim(_req(count=2), constraints=[{"distinctAttribute": "gpu.partita.dev/productName"}])
    [r] = Explainer(slices, CLASSES).explain(claim).requests
    assert _stages(r)["constraint"] == 1 and r.candidates == {"node-a": 1}
    lacking = _claim(_req(), constraints=[{"matchAttribute": "example.com/rack"}])
    e = Explainer(slices, CLASSES).explain(lacking)
    assert _stages(e.requests[0])["constraint"] == 2 and e.fix == "remove spec.devices.constraints[0]"


def test_requests_that_fit_alone_but_not_together(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req("a", count=2), _req("b", count=1)))
    assert [r.candidates for r in e.requests] == [{"node-a": 2}, {"node-a": 2}]
    assert "enough alone" in e.requests[0].verdict
    assert e.fix == "lower spec.devices.requests[0].exactly.count from 2 to 1"
    assert "remove spec.devices.requests[1] (request b)" in e.alternatives


def test_first_available_subrequests_are_explained_and_fixed_each(h100x2) -> None:
    slices, _ = h100x2
    req = {"name": "r", "firstAvailable": [
        {"name": "three", "deviceClassName": C.DEVICE_CLASS_GPU, "count": 3},
        {"name": "b200", "deviceClassName": C.DEVICE_CLASS_GPU, "selectors": [{"cel": {"expression": B200}}]}]}
    e = Explainer(slices, CLASSES).explain(_claim(req))
    assert [r.request for r in e.requests] == ["r/three", "r/b200"]
    assert e.requests[0].candidates == {"node-a": 2} and _stages(e.requests[1])["request selector"] == 2
    fixes = [e.fix, *e.alternatives]
    assert "lower spec.devices.requests[0].firstAvailable[0].count from 3 to 2" in fixes
    assert f"remove spec.devices.requests[0].firstAvailable[1].selectors[0] ({B200})" in fixes


def test_slices_for_no_known_node_and_nodes_given_with_labels(h100x2) -> None:
    slices, gpus = h100x2
    by_label = node_slices("node-b", "H100-SXM5-80GB:1")
    for s in by_label:
        del s["spec"]["nodeName"]
        s["spec"]["nodeSelector"] = {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "example.com/gpu-pool", "operator": "In", "values": ["b"]}]}]}
    held = _allocated("trainer", "node-a", *gpus)
    e = Explainer(slices + by_label, CLASSES, [held]).explain(_claim(_req()))
    [r] = e.requests
    assert _stages(r)["node"] == _n_devices(by_label) and r.published == _n_devices(slices + by_label)
    assert all(x.startswith("node-b/") for x in r.stages[0].examples) and r.stages[0].reason == "node"
    from controller.allocator import Node
    fits = Explainer(slices + by_label, CLASSES, [held], nodes=[Node("worker-7", {"example.com/gpu-pool": "b"})])
    got = fits.explain(_claim(_req()))
    assert got.fits and got.node == "worker-7" and got.devices[0].startswith("node-b/gpu-")


def test_devices_of_an_incomplete_pool(h100x2) -> None:
    slices, _ = h100x2
    partial = [s for s in slices if s["spec"].get("devices")]       # the counters slice is missing
    e = Explainer(partial, CLASSES).explain(_claim(_req()))
    [r] = e.requests
    assert _stages(r) == {"pool": _n_devices(slices)} and e.fix is None
    assert "excluded by pool (resource pool incomplete (being updated) or invalid)" in render(e)


def test_no_single_change_is_said_honestly(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(count=3, selectors=["device.attributes['gpu.partita.dev'].productName == 'x'"])))
    assert e.fix is None and e.alternatives == [] and render(e).endswith("fix: no single change makes it fit")


def test_a_search_that_gives_up_is_reported_not_taken_for_unsatisfiable(h100x2, monkeypatch) -> None:
    import controller.allocator.explain as explain

    slices, _ = h100x2
    claim = _claim(_req(count=2), _req("share", cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": "90Gi"}}))
    assert Explainer(slices, CLASSES).explain(claim).undecided == []
    # the allocator's hook: a step limit per node, node-local (other nodes may still be tried)
    from controller.allocator import AllocatedState, Allocator, Node, SliceIndex, copy_claim_with_tolerations
    from controller.allocator.search import SearchLimitExceeded

    tolerated = copy_claim_with_tolerations(claim, [C.managed_toleration()])
    with pytest.raises(SearchLimitExceeded, match="search on node node-a gave up after 3 steps") as err:
        Allocator(max_steps=3).allocate(Node("node-a"), [tolerated], SliceIndex.from_slices(slices), CLASSES,
                                        AllocatedState())
    assert err.value.node_local
    assert Allocator().allocate(Node("node-a"), [tolerated], SliceIndex.from_slices(slices), CLASSES,
                                AllocatedState()) is None
    monkeypatch.setattr(explain, "CLAIM_STEPS", 3)
    e = Explainer(slices, CLASSES).explain(claim)
    assert not e.fits and e.undecided == ["node-a"]
    assert "the search gave up on 1 node(s) after 3 steps each (too many combinations); the claim may fit there: " \
        "node-a" in render(e)
    monkeypatch.setattr(explain, "FIX_SECONDS", 0.0)
    e = Explainer(slices, CLASSES).explain(claim)
    assert e.fix is None and e.notes and e.notes[0].startswith("stopped trying changes after 0s (0 of ")


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_, match", [
    (_req(cls="nope.partita.dev"), r"request gpu.*nope\.partita\.dev.*not found"),
    (_req(selectors=["device.attributes[ =="]), r"request gpu.*selector #0: CEL compile error"),
    (_req(selectors=["device.attributes['gpu.partita.dev'].rack == 'r1'"]), r"request gpu.*selector #0 on device"),
    (_req(count=-1), r"request gpu: count -1 is invalid"),
    (_req(count=33), r"33 exceeds the claim limit of 32"),
    (_req(cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": "ten gigs"}}), r"request gpu: capacity.requests"),
])
def test_bad_input_raises_an_allocation_error_naming_the_request(h100x2, request_, match) -> None:
    slices, _ = h100x2
    with pytest.raises(AllocationError, match=match):
        Explainer(slices, CLASSES).explain(_claim(request_))


def test_a_misspelled_attribute_gets_one_hint_that_explain_itself_accepts(h100x2) -> None:
    """The hint names the closest attribute the device has and the optional-chaining spelling, and that
    spelling is a selector explain (the allocator's CEL) accepts: no "unsupported" refusal of ``.?``."""
    slices, _ = h100x2
    typo = "device.attributes['gpu.partita.dev'].productname == 'NVIDIA B200'"
    with pytest.raises(AllocationError, match="no such key: productname") as err:
        Explainer(slices, CLASSES).explain(_claim(_req(selectors=[typo])))
    assert "did you mean 'productName'?" in str(err.value)
    guarded = "device.attributes[\"gpu.partita.dev\"].?productname.orValue('') == 'NVIDIA B200'"
    assert f"{guarded.split('.orValue')[0]}.orValue(<default>)" in str(err.value)
    e = Explainer(slices, CLASSES).explain(_claim(_req(selectors=[guarded])))
    [r] = e.requests
    assert not e.fits and _stages(r)["request selector"] == 2
    ok = "device.attributes['gpu.partita.dev'].?productName.orValue('').startsWith('NVIDIA H100')"
    assert Explainer(slices, CLASSES).explain(_claim(_req(selectors=[ok]))).fits


def test_nothing_to_explain_against() -> None:
    with pytest.raises(ExplainInputError, match="no ResourceSlice names a node"):
        Explainer([], CLASSES).explain(_claim(_req()))


# -- the command -----------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path, h100x2):
    slices, gpus = h100x2
    (tmp_path / "slices").mkdir()
    (tmp_path / "slices" / "a.yaml").write_text(yaml.safe_dump_all(slices))
    template = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                "metadata": {"name": "pair", "namespace": "ml"},
                "spec": {"spec": {"devices": {"requests": [_req(count=2)]}}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(template))
    (tmp_path / "held.yaml").write_text(yaml.safe_dump(_allocated("trainer", "node-a", gpus[0])))
    return tmp_path


def test_cli_reads_files_and_exits_by_outcome(files, capsys) -> None:
    base = ["explain", "-f", str(files / "t.yaml"), "--slices", str(files / "slices")]
    assert main(base) == 0
    assert "claim ml/pair fits: node node-a" in capsys.readouterr().out
    assert main([*base, "--allocated", str(files / "held.yaml"), "-o", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["claim"] == "ml/pair" and out["fits"] is False
    assert out["fix"].startswith("free node-a/gpu-") and "held by claim default/trainer" in out["fix"]
    assert out["alternatives"] == ["lower spec.devices.requests[0].exactly.count from 2 to 1"]
    [r] = out["requests"]
    assert [s["reason"] for s in r["stages"]] == ["class selector", "allocated"] and r["candidates"] == {"node-a": 1}
    assert main([*base, "--allocated", str(files / "held.yaml")]) == 1
    text = capsys.readouterr().out
    assert "excluded by allocated (held by another claim); e.g. node-a/gpu-" in text
    assert "fix: free node-a/gpu-" in text and "\n  or: lower spec.devices.requests[0].exactly.count" in text


def test_cli_classes_and_nodes_from_files(files, capsys) -> None:
    classes = [c for c in device_classes() if c["metadata"]["name"] != C.DEVICE_CLASS_GPU]
    (files / "classes.yaml").write_text(yaml.safe_dump_all(classes))
    rc = main(["explain", "-f", str(files / "t.yaml"), "--slices", str(files / "slices"),
               "--classes", str(files / "classes.yaml")])
    assert rc == 2 and f"could not retrieve device class {C.DEVICE_CLASS_GPU}" in capsys.readouterr().err
    by_label = node_slices("node-b", "H100-SXM5-80GB:2")
    for sl in by_label:
        del sl["spec"]["nodeName"]
        sl["spec"]["nodeSelector"] = {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "example.com/gpu-pool", "operator": "In", "values": ["b"]}]}]}
    (files / "slices" / "b.yaml").write_text(yaml.safe_dump_all(by_label))
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-7", "labels": {"example.com/gpu-pool": "b"}}}
    (files / "nodes.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [node]}))
    base = ["explain", "-f", str(files / "t.yaml"), "--slices", str(files / "slices"), "--allocated",
            str(files / "held.yaml"), "-o", "json"]
    assert main(base) == 1
    assert [s["reason"] for s in json.loads(capsys.readouterr().out)["requests"][0]["stages"]] == \
        ["node", "class selector", "allocated"]
    assert main([*base, "--nodes", str(files / "nodes.yaml")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["node"] == "worker-7" and all(d.startswith("node-b/") for d in out["devices"])


@pytest.mark.parametrize("content, args, message", [
    ("kind: Pod\nmetadata: {name: x}\n", [], "expected a ResourceClaim or ResourceClaimTemplate, got kind 'Pod'"),
    ("kind: ResourceClaim\nmetadata: {name: x}\nspec: {devices: {}}\n", [], "has no spec.devices.requests"),
    ("kind: ResourceClaim\nmetadata: {name: x}\nspec: {devices: {requests: [{name: a}]}}\n", [],
     "spec.devices.requests[0] needs a name and either exactly or firstAvailable"),
    ("a: [unclosed\n", [], "is not valid YAML or JSON"),
    (None, [], "cannot read"),
    ("kind: ResourceClaim\nmetadata: {name: x}\nspec: {devices: {requests: [{name: a, exactly: "
     "{deviceClassName: gpu.partita.dev, count: 0}}]}}\n", [], "request a: count 0 is invalid"),
    ("kind: ResourceClaim\nmetadata: {name: x}\n", ["--claim", "default/y"], "no claim matches in"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(files, capsys, content, args, message) -> None:
    path = files / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["explain", "-f", str(path), "--slices", str(files / "slices"), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_without_slices_in_the_files(files, capsys) -> None:
    (files / "empty").mkdir()
    (files / "empty" / "pod.yaml").write_text("kind: Pod\nmetadata: {name: x}\n")
    assert main(["explain", "-f", str(files / "t.yaml"), "--slices", str(files / "empty")]) == 2
    assert "no ResourceSlices found (only Pod) in --slices" in capsys.readouterr().err


@pytest.fixture
def server(h100x2):
    slices, gpus = h100x2
    s = ApiServer()
    url = s.start_in_thread()
    s.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {}}})
    for c in device_classes():
        s.create(c)
    for sl in slices:
        s.create(sl)
    s.create(_allocated("trainer", "node-a", gpus[0]))
    s.create(_claim(_req(count=2), name="pair"))
    yield s, url
    s.stop_in_thread()


def test_cli_reads_claim_slices_classes_and_allocations_from_the_api_server(server, h100x2, capsys) -> None:
    _, url = server
    _, gpus = h100x2
    assert main(["explain", "--claim", "default/pair", "--kube-api", url, "-o", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["claim"] == "default/pair" and out["requests"][0]["candidates"] == {"node-a": 1}
    assert out["fix"] == f"free node-a/{gpus[0]} held by claim default/trainer (delete that claim, or the pods using it)"
    assert out["alternatives"] == ["lower spec.devices.requests[0].exactly.count from 2 to 1"]
    assert main(["explain", "--claim", "default/missing", "--kube-api", url]) == 2
    assert "ResourceClaim missing not found in namespace default" in capsys.readouterr().err


def test_cli_unreachable_api_server(tmp_path, capsys) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_claim(_req())))
    assert main(["explain", "-f", str(tmp_path / "c.yaml"), "--kube-api", "http://127.0.0.1:9"]) == 2
    assert "API server (http://127.0.0.1:9)" in capsys.readouterr().err


# -- one multi-document file, kubeconfig contexts, output formats ------------------------------------
def test_cli_one_multi_document_file_holds_claim_slices_classes_and_allocations(h100x2, tmp_path, capsys) -> None:
    slices, gpus = h100x2
    pair = _claim(_req(count=2), name="pair")
    single = _claim(_req(), name="single")
    held = _allocated("trainer", "node-a", gpus[0])
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all([pair, *slices, *device_classes(), held, single]))
    # no --slices, no cluster: the file's slices and classes; the allocated claim in it holds a GPU
    assert main(["explain", "-f", str(path), "--claim", "pair", "-o", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["claim"] == "default/pair" and out["requests"][0]["candidates"] == {"node-a": 1}
    assert "held by claim default/trainer" in out["fix"]
    assert main(["explain", "-f", str(path), "--claim", "default/single"]) == 0
    assert "claim default/single fits: node node-a" in capsys.readouterr().out
    # several claims and none picked, or a name the file lacks: exit 2 naming what the file holds
    assert main(["explain", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "holds 3 claims (default/pair, default/trainer, default/single); pick one with --claim NAME" in err
    assert main(["explain", "-f", str(path), "--claim", "nope"]) == 2
    assert "--claim nope: no claim matches" in capsys.readouterr().err
    # the same kind both in the file and by flag is ambiguous
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.yaml").write_text(yaml.safe_dump_all(slices))
    assert main(["explain", "-f", str(path), "--claim", "pair", "--slices", str(tmp_path / "s")]) == 2
    assert "holds ResourceSlice objects and --slices gives more" in capsys.readouterr().err


def _kubeconfig(tmp_path, url: str, namespace: str | None) -> str:
    ctx = {"cluster": "sandbox", "user": "me", **({"namespace": namespace} if namespace else {})}
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "plain",
           "clusters": [{"name": "sandbox", "cluster": {"server": url}}],
           "users": [{"name": "me", "user": {"token": "t"}}],
           "contexts": [{"name": "plain", "context": {"cluster": "sandbox", "user": "me"}},
                        {"name": "team", "context": ctx}]}
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_cli_claim_namespace_comes_from_n_or_the_kubeconfig_context(server, tmp_path, capsys) -> None:
    s, url = server
    team = _claim(_req(), name="solo")
    team["metadata"]["namespace"] = "team-a"
    s.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    s.create(team)
    kc = _kubeconfig(tmp_path, url, "team-a")
    # the context "team" sets namespace team-a: --claim NAME finds team-a/solo
    assert main(["explain", "--claim", "solo", "--kubeconfig", kc, "--context", "team", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["claim"] == "team-a/solo"
    # the current context has no namespace: default, where solo is not
    assert main(["explain", "--claim", "solo", "--kubeconfig", kc]) == 2
    assert "ResourceClaim solo not found in namespace default" in capsys.readouterr().err
    # -n overrides the context's namespace
    assert main(["explain", "--claim", "solo", "--kubeconfig", kc, "-n", "team-a"]) == 0
    assert main(["explain", "--claim", "pair", "--kubeconfig", kc, "--context", "team", "-n", "default"]) == 1
    capsys.readouterr()
    # an unknown context is a clear exit 2
    assert main(["explain", "--claim", "solo", "--kubeconfig", kc, "--context", "nope"]) == 2
    assert "cannot reach the API server (kubeconfig" in capsys.readouterr().err


def test_cli_output_vocabulary(files, capsys) -> None:
    base = ["explain", "-f", str(files / "t.yaml"), "--slices", str(files / "slices")]
    assert main([*base, "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["claim"] == "ml/pair"
    assert main([*base, "-o", "wide"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n  device node-a/gpu-") == 2
    assert main([*base, "-o", "text"]) == 0          # the old name: still accepted, with a note
    r = capsys.readouterr()
    assert "claim ml/pair fits" in r.out and "-o text is deprecated; use -o table" in r.err
    with pytest.raises(SystemExit) as e:
        main([*base, "-o", "xml"])
    assert e.value.code == 2 and "invalid output 'xml'" in capsys.readouterr().err


def test_a_class_selector_failing_on_a_device_with_binding_conditions_is_not_an_error() -> None:
    """Upstream never evaluates selectors on a device with binding conditions while the feature is off, and
    the allocator's search does not either; explain used to raise the selector's CEL error for it."""
    slices = [{"metadata": {"name": "s1"}, "spec": {
        "driver": "example.com", "nodeName": "n1", "pool": {"name": "n1", "generation": 1, "resourceSliceCount": 1},
        "devices": [{"name": "a", "attributes": {"model": {"string": "x"}}},
                    {"name": "b", "attributes": {"other": {"string": "x"}}, "bindingConditions": ["ready"],
                     "bindingFailureConditions": ["failed"]}]}}]
    classes = {"c": {"metadata": {"name": "c"}, "spec": {"selectors": [
        {"cel": {"expression": "device.attributes['example.com'].model == 'y'"}}]}}}
    claim = {"metadata": {"name": "w", "namespace": "default"}, "spec": {"devices": {"requests": [
        {"name": "r", "exactly": {"deviceClassName": "c", "allocationMode": "ExactCount", "count": 1}}]}}}
    e = Explainer(slices, classes, managed_toleration=False).explain(claim)
    assert not e.fits
    [r] = e.requests
    assert {s.reason: s.examples for s in r.stages} == {"class selector": ["n1/a"], "request selector": ["n1/b"]}
