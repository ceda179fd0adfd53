"""Pods that ask for nvidia.com/gpu (the NVIDIA device plugin's extended resource) on a Partita cluster:
the controller says once per pod what to do (docs/migration.md), and the sandbox reports them as pending
with that reason instead of timing out."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from controller.operator.extendedresources import ExtendedResourceAdvisor, requested_resources
from driver.api import constants as C
from driver.slices import SliceFeatures
from tests.support.cluster import node, pod, run

pytestmark = pytest.mark.timeout(120)

REASON = "PartitaExtendedResource"


def legacy_pod(name: str, resource: str = "nvidia.com/gpu", where: str = "limits") -> dict:
    p = pod(name, [])
    del p["spec"]["resourceClaims"]
    p["spec"]["containers"][0]["resources"] = {where: {resource: "1", "cpu": "1"}}
    return p


def test_requested_resources_reads_limits_requests_init_containers_and_skips_zero() -> None:
    p = legacy_pod("p")
    p["spec"]["initContainers"] = [{"name": "i", "image": "x", "resources": {"requests": {"example.com/gpu": "2"}}}]
    p["spec"]["containers"].append({"name": "z", "image": "x", "resources": {"limits": {"nvidia.com/mig-1g.10gb": "0"}}})
    assert requested_resources(p) == ["nvidia.com/gpu", "cpu", "example.com/gpu"]


def test_advice_is_given_once_per_pod_and_again_for_a_new_pod() -> None:
    adv = ExtendedResourceAdvisor(C.DEFAULT_DRIVER_NAME, C.ALLOCATION_MODE_CONTROLLER)
    p = legacy_pod("p")
    p["metadata"]["uid"] = "u1"
    first = adv.check(p, [node("n")], {}, {C.DEVICE_CLASS_GPU}, serves_gpus=True)
    again = adv.check(p, [node("n")], {}, {C.DEVICE_CLASS_GPU}, serves_gpus=True)
    assert first and first.first and again and not again.first
    assert first.reason == "requests nvidia.com/gpu, which Partita does not serve — see docs/migration.md"
    adv.forget(p)       # deleted; a pod of the same name is a new pod
    assert adv.check(p, [node("n")], {}, {C.DEVICE_CLASS_GPU}, serves_gpus=True).first
    # a MIG resource of the device plugin points at the MIG class
    mig = adv.check(legacy_pod("m", "nvidia.com/mig-1g.10gb"), [], {}, set(), serves_gpus=True)
    assert mig and "deviceClassName mig.partita.dev" in mig.message
    # right after start the watches bring nodes and pods in any order: advice waits for the delay
    late = legacy_pod("late")
    late["metadata"]["uid"] = "u2"
    assert not adv.check(late, [], {}, set(), serves_gpus=True, now=10.0, delay=2.0).due
    assert not adv.check(late, [], {}, set(), serves_gpus=True, now=11.0, delay=2.0).due
    assert adv.check(late, [], {}, set(), serves_gpus=True, now=12.0, delay=2.0).due
    # no Partita devices published: not our business
    assert adv.check(legacy_pod("q"), [], {}, set(), serves_gpus=False) is None
    # scheduler mode without the mapping: the message names the chart value that would serve it
    sched = ExtendedResourceAdvisor(C.DEFAULT_DRIVER_NAME, C.ALLOCATION_MODE_SCHEDULER)
    assert "deviceClasses.gpu.extendedResourceName" in sched.check(legacy_pod("s"), [], {}, set(), serves_gpus=True).message


def test_controller_tells_a_pod_asking_for_nvidia_gpu_what_to_do() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.server.create(legacy_pod("legacy"))
        _, _, message = await cl.event(REASON)
        assert "requests nvidia.com/gpu" in message and "deviceClassName gpu.partita.dev" in message
        assert "device plugin on other nodes" in message and "docs/migration.md" in message
        assert cl.controller.why_pending["default/legacy"] == \
            "requests nvidia.com/gpu, which Partita does not serve — see docs/migration.md"
        # posted through the API as an Event on the pod
        events = [e for e in cl.server.list("events") if e.get("reason") == REASON]
        assert [e["involvedObject"]["name"] for e in events] == ["legacy"]
        # the configured name is not watched by default; a pod with a claim and a plain pod get nothing
        cl.server.create(legacy_pod("other", "example.com/gpu"))
        cl.server.create(legacy_pod("requests-only", "nvidia.com/gpu", where="requests"))
        await cl.server.wait_for(lambda _: len(cl.events(REASON)) == 2 or None, 10)
        assert {e[0] for e in cl.events(REASON)} == {"Pod/default/legacy", "Pod/default/requests-only"}
    run(scenario)


def test_configured_name_and_nodes_that_serve_it() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        dp = node("dp-node")
        dp["status"]["allocatable"]["nvidia.com/gpu"] = "8"     # the device plugin runs there
        cl.server.create(dp)
        cl.server.create(legacy_pod("served"))                    # kube-scheduler can place it on dp-node
        cl.server.create(legacy_pod("custom", "example.com/gpu"))
        _, _, message = await cl.event(REASON)
        assert "requests example.com/gpu" in message
        await asyncio.sleep(0.6)
        assert [e[0] for e in cl.events(REASON)] == ["Pod/default/custom"]
        assert "default/served" not in cl.controller.why_pending
        assert cl.controller.why_pending["default/custom"].startswith("requests example.com/gpu")
        # a node that serves it joins: the reason is withdrawn (kube-scheduler can place the pod now)
        other = node("dp-node-2")
        other["status"]["allocatable"]["example.com/gpu"] = "1"
        cl.server.create(other)
        await cl.server.wait_for(lambda _: "default/custom" not in cl.controller.why_pending or None, 10)
        assert len(cl.events(REASON)) == 1
    run(scenario, extended_resource_names=("nvidia.com/gpu", "example.com/gpu"))


def test_implicit_class_resource_in_controller_mode_is_advised() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.server.create(legacy_pod("implicit", "deviceclass.resource.kubernetes.io/gpu.partita.dev"))
        _, _, message = await cl.event(REASON)
        assert "deviceclass.resource.kubernetes.io/gpu.partita.dev" in message
    run(scenario)


def test_scheduler_mode_class_with_extended_resource_name_serves_it() -> None:
    async def scenario(cl):
        cls = cl.server.get("deviceclasses", C.DEVICE_CLASS_GPU)
        cls["spec"]["extendedResourceName"] = "nvidia.com/gpu"
        cl.server.update(cls)
        cl.add_node("node-a", "H100-SXM5-80GB:1", features=SliceFeatures(taints=False))
        cl.server.create(legacy_pod("mapped"))                       # kube-scheduler serves it (KEP-5004)
        cl.server.create(legacy_pod("unmapped", "nvidia.com/mig-1g.10gb"))
        _, _, message = await cl.event(REASON)
        assert "deviceClassName mig.partita.dev" in message and "whole GPUs only" in message
        await asyncio.sleep(0.6)
        assert [e[0] for e in cl.events(REASON)] == ["Pod/default/unmapped"]
    run(scenario, allocation_mode=C.ALLOCATION_MODE_SCHEDULER)


@pytest.mark.slow
def test_sandbox_reports_such_pods_as_pending_with_the_reason(tmp_path) -> None:
    wl = tmp_path / "wl.yaml"
    wl.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: legacy}
        spec:
          containers:
          - name: app
            image: busybox
            resources: {limits: {nvidia.com/gpu: 1}}
        """))
    r = subprocess.run([sys.executable, "-m", "controller", "sandbox", "--node", "n=L4:1", "-f", str(wl),
                        "--timeout", "30"], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "did not settle" not in r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("default/legacy"))
    assert row.split()[1] == "Pending"
    pending = r.stdout.split("Pending:")[1]
    assert "default/legacy: requests nvidia.com/gpu, which Partita does not serve — see docs/migration.md" in pending


def test_controller_flag_names_are_checked(monkeypatch) -> None:
    import argparse

    from controller.operator import main as controller_main
    from controller.operator.extendedresources import parse_names

    assert parse_names(" nvidia.com/gpu, example.com/gpu ,") == ("nvidia.com/gpu", "example.com/gpu")
    with pytest.raises(ValueError, match=r"--extended-resource-names: 'gpu' is not an extended resource name"):
        parse_names("nvidia.com/gpu,gpu")
    # the controller refuses a malformed flag at start (exit 2) instead of watching a name that cannot exist
    p = argparse.ArgumentParser()
    controller_main.add_arguments(p)
    args = p.parse_args(["--extended-resource-names", "kubernetes.io/gpu", "--kube-api", "http://127.0.0.1:9"])
    assert controller_main.run(args) == 2
    monkeypatch.setenv("EXTENDED_RESOURCE_NAMES", "example.com/gpu")
    p = argparse.ArgumentParser()
    controller_main.add_arguments(p)
    assert p.parse_args([]).extended_resource_names == "example.com/gpu"
