"""``partita explain``: per-request exclusion counts, the node verdict, and the single fix."""

from __future__ import annotations

import json

import pytest
import yaml

from controller.allocator import AllocationError
from controller.allocator.explain import Explainer, render
from controller.cli import main
from driver.api import constants as C
from driver.api import naming
from driver.api.deviceclasses import device_classes
from tests.support.cluster import node_slices

CLASSES = {c["metadata"]["name"]: c for c in device_classes()}


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


@pytest.fixture(scope="module")
def h100x2():
    slices = node_slices("node-a", "H100-SXM5-80GB:2")
    gpus = sorted({d["name"] for s in slices for d in s["spec"].get("devices") or []
                   if d["attributes"]["type"]["string"] == "gpu"})
    return slices, gpus


def test_a_fitting_claim_says_where(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(count=2)))
    assert e.fits and e.node == "node-a" and len(e.devices) == 2
    assert render(e).startswith("claim default/c fits: node node-a")


def test_too_many_devices_counts_the_class_and_suggests_a_lower_count(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(count=3)))
    [r] = e.requests
    assert not e.fits and r.candidates == {"node-a": 2}
    assert _stages(r) == {"class selector": r.published - 2}      # MIG and shared devices are not class gpu
    assert "needs 3 on one node" in r.verdict
    assert e.fix == "lower spec.devices.requests[0].exactly.count from 3 to 2"


def test_request_selector_and_its_removal(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(selectors=["device.attributes['gpu.partita.dev'].productName == 'NVIDIA B200'"])))
    [r] = e.requests
    assert _stages(r)["request selector"] == 2 and r.candidates == {"node-a": 0}
    assert e.fix.startswith("remove spec.devices.requests[0].exactly.selectors[0]")


def test_an_untolerated_taint_is_named_and_the_toleration_suggested(h100x2) -> None:
    slices, gpus = h100x2
    tainted = yaml.safe_load(yaml.safe_dump(slices))
    for s in tainted:
        for d in s["spec"].get("devices") or []:
            if d["name"] in gpus:
                d.setdefault("taints", []).append({"key": "example.com/maintenance", "value": "bios",
                                                   "effect": "NoSchedule"})
    e = Explainer(tainted, CLASSES).explain(_claim(_req()))
    [r] = e.requests
    assert _stages(r)["taint"] == 2
    assert '"key": "example.com/maintenance"' in e.fix and "tolerations" in e.fix
    # the managed taint itself is tolerated as the controller does; as kube-scheduler sees it, it is not
    r2 = Explainer(slices, CLASSES, managed_toleration=False).explain(_claim(_req())).requests[0]
    assert _stages(r2)["taint"] == 2


def test_devices_held_by_others_and_counters_used_by_another_mode(h100x2) -> None:
    slices, gpus = h100x2
    held = _allocated("trainer", "node-a", gpus[0])
    mig = _allocated("infer", "node-a", naming.mig_device_name(gpus[1], "1g.10gb", 0))
    e = Explainer(slices, CLASSES, [held, mig]).explain(_claim(_req()))
    [r] = e.requests
    # one whole GPU is held; the other is in MIG use, so its counters are gone
    assert _stages(r)["allocated"] == 1 and _stages(r)["counters"] == 1
    assert e.fix == "free the devices held by claim default/trainer (delete it, or the pods using it)"


def test_shared_capacity_left_and_a_smaller_request(h100x2) -> None:
    slices, gpus = h100x2
    shares = [_allocated(f"nb{i}", "node-a", naming.shared_device_name(g),
                         share={"shareID": f"00000000-0000-0000-0000-00000000000{i}", "consumedCapacity": {"memory": "70Gi"}})
              for i, g in enumerate(gpus)]
    want = _req(cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": "20Gi"}})
    e = Explainer(slices, CLASSES, shares).explain(_claim(want))
    [r] = e.requests
    assert _stages(r)["capacity"] == 2
    assert e.fix.startswith("ask for ") and "instead of 20Gi" in e.fix


def test_a_constraint_that_rules_the_combination_out() -> None:
    slices = node_slices("mixed", "H100-SXM5-80GB:1,L4:1")
    claim = _claim(_req(count=2), constraints=[{"requests": ["gpu"], "matchAttribute": "gpu.partita.dev/productName"}])
    e = Explainer(slices, CLASSES).explain(claim)
    [r] = e.requests
    assert r.candidates == {"mixed": 2} and "constraints" in r.verdict
    assert e.fix == "remove spec.devices.constraints[0]"


def test_no_single_change_is_said_honestly(h100x2) -> None:
    slices, _ = h100x2
    e = Explainer(slices, CLASSES).explain(_claim(_req(count=3, selectors=["device.attributes['gpu.partita.dev'].productName == 'x'"])))
    assert e.fix is None and render(e).endswith("fix: no single change makes it fit")


def test_bad_input_raises_an_allocation_error_naming_the_request(h100x2) -> None:
    slices, _ = h100x2
    with pytest.raises(AllocationError, match="request gpu.*nope.partita.dev"):
        Explainer(slices, CLASSES).explain(_claim(_req(cls="nope.partita.dev")))
    with pytest.raises(AllocationError, match=r"selectors\[0\]|CEL"):
        Explainer(slices, CLASSES).explain(_claim(_req(selectors=["device.attributes[ =="])))


def test_cli_reads_files_and_exits_by_outcome(tmp_path, h100x2, capsys) -> None:
    slices, gpus = h100x2
    (tmp_path / "slices").mkdir()
    (tmp_path / "slices" / "a.yaml").write_text(yaml.safe_dump_all(slices))
    template = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                "metadata": {"name": "pair", "namespace": "ml"},
                "spec": {"spec": {"devices": {"requests": [_req(count=2)]}}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(template))
    (tmp_path / "held.yaml").write_text(yaml.safe_dump(_allocated("trainer", "node-a", gpus[0])))
    assert main(["explain", "-f", str(tmp_path / "t.yaml"), "--slices", str(tmp_path / "slices")]) == 0
    assert "fits: node node-a" in capsys.readouterr().out
    rc = main(["explain", "-f", str(tmp_path / "t.yaml"), "--slices", str(tmp_path / "slices"),
               "--allocated", str(tmp_path / "held.yaml"), "-o", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["claim"] == "ml/pair" and out["fix"].startswith("lower")
    assert out["requests"][0]["stages"][-1]["reason"] == "allocated"
    (tmp_path / "bad.yaml").write_text("kind: Pod\nmetadata: {name: x}\n")
    assert main(["explain", "-f", str(tmp_path / "bad.yaml"), "--slices", str(tmp_path / "slices")]) == 2
    assert "expected a ResourceClaim or ResourceClaimTemplate" in capsys.readouterr().err
