"""DeviceTaintRules end to end in the sandbox (the emulator serves resource.k8s.io/v1alpha3
devicetaintrules, applied from a manifest): a maintenance rule (NoSchedule) keeps new allocations off the
device it selects, and a NoExecute rule is reported on the pod using the device it selects."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from controller.sandbox import manifests as mf
from controller.sandbox.main import Sandbox
from driver.api import constants as C
from driver.nvml import profile_from_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NODE = "gpu-node"


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "gpu"}]}}],
                     "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}]}}


TEMPLATE = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
            "metadata": {"name": "one-gpu", "namespace": "default"},
            "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": C.DEVICE_CLASS_GPU}}]}}}}


def _rule(name: str, device: str, effect: str) -> str:
    return yaml.safe_dump({"apiVersion": "resource.k8s.io/v1alpha3", "kind": "DeviceTaintRule", "metadata": {"name": name},
                           "spec": {"deviceSelector": {"driver": C.DEFAULT_DRIVER_NAME, "pool": NODE, "device": device},
                                    "taint": {"key": "example.com/maintenance", "value": "firmware", "effect": effect}}})


def test_a_maintenance_rule_stops_new_allocations_and_a_noexecute_rule_is_reported_on_the_pod(tmp_path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("L4:2", NODE), workdir, strategy="first-fit")
        await sb.start()
        try:
            server = sb.server
            devices = sorted(d["name"] for s in server.list("resourceslices") for d in s["spec"].get("devices") or []
                             if not d["name"].endswith("-shared"))      # the two whole GPUs
            assert len(devices) == 2, devices
            maintained, other = devices
            # the administrator takes one GPU out for maintenance, from a manifest
            path = tmp_path / "maintenance.yaml"
            path.write_text(_rule("gpu-maintenance", maintained, "NoSchedule"))
            mf.apply(server, mf.load([path]))
            server.create(TEMPLATE)
            for p in ("first", "second"):
                server.create(_pod(p))
            assert await sb.wait_settled(60), sb.report()[0]
            _, data = sb.report()
            by_name = {p["name"]: p for p in data["pods"]}
            running = [n for n, p in by_name.items() if p["phase"] == "Running"]
            assert len(running) == 1, by_name
            [(dev,)] = [tuple(d["device"] for d in devs) for devs in by_name[running[0]]["claims"].values()]
            assert dev == other                       # never the device under maintenance
            [waiting] = [p for n, p in by_name.items() if n not in running]
            assert waiting["phase"] != "Running" and "DeviceTaintRule gpu-maintenance" in waiting["pending"], waiting
            # the rule goes: the waiting pod gets the device
            server.delete("devicetaintrules", "gpu-maintenance", group="resource.k8s.io")
            assert await sb.wait_settled(60), sb.report()[0]
            assert all(p["phase"] == "Running" for p in sb.report()[1]["pods"]), sb.report()[0]
            # a NoExecute rule on the device the first pod uses: an Event on that pod names the rule and the device
            running_pod = running[0].split("/")[1]
            server.create(yaml.safe_load(_rule("gpu-evict", other, "NoExecute")))
            want = f"device {NODE}/{other}"

            def reported(s) -> bool:  # noqa: ANN001
                return any(e.get("reason") == "PartitaDeviceTaintNoExecute" and
                           e["involvedObject"]["name"] == running_pod and want in e.get("message", "") and
                           "DeviceTaintRule gpu-evict" in e.get("message", "") for e in s.list("events"))
            await server.wait_for(reported, 30)
            # the pod on the other device is not reported
            assert not any(e.get("reason") == "PartitaDeviceTaintNoExecute" and e["involvedObject"]["name"] != running_pod
                           for e in server.list("events"))
            assert await sb.delete_workload() == []
        finally:
            assert await sb.stop() == []

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
