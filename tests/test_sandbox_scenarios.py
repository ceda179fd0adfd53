"""Scenarios the sandbox runs end to end (real plugin processes, controller, kubelet stand-ins):
a GPU moving whole -> MIG -> whole as pods come and go (issue: MIG partitions), and notebooks packing
eight to an 80GB GPU (issue: shared GPUs)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from controller.sandbox.main import Sandbox
from driver.api import constants as C
from driver.api import naming
from driver.nvml import open_backend, profile_from_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
NODE = "node-a"


def _template(name: str, cls: str, selector: str | None = None) -> dict:
    exactly: dict = {"deviceClassName": cls}
    if selector:
        exactly["selectors"] = [{"cel": {"expression": selector}}]
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}}


def _pod(name: str, template: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "gpu"}]}}],
                     "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": template}]}}


class MigScenario:
    def __init__(self, sb: Sandbox):
        self.sb = sb
        self.server = sb.server
        plugin = sb.plugins[0]
        self.nvml = open_backend("fake", profile=sb.profile, node_name=NODE,
                                 state_dir=plugin.paths.plugin_dir(sb.driver) / "fake-nvml")
        self.nvml.init()

    async def run(self, *pods: dict) -> None:
        for p in pods:
            self.server.create(p)
        assert await self.sb.wait_settled(60), self.sb.report()[0]

    def devices(self, pod: str) -> list[str]:
        k = next(k for k in self.sb.kubelets if f"default/{pod}" in k.prepared)
        return [d["device"] for devs in k.prepared[f"default/{pod}"].claims.values() for d in devs]

    def phase(self, pod: str) -> str:
        return (self.server.get("pods", pod, "default").get("status") or {}).get("phase")

    async def delete(self, *pods: str) -> None:
        for p in pods:
            self.server.delete("pods", p, "default")
        await self.server.wait_for(lambda s: all(s.get("pods", p, "default") is None for p in pods) and
                                   all(not (c.get("metadata") or {}).get("deletionTimestamp")
                                       for c in s.list("resourceclaims", group="resource.k8s.io")), 30)

    def gpu_state(self, uuid: str) -> tuple[bool, list[tuple[int, int, int]]]:
        h = self.nvml.device_by_uuid(uuid)
        mode = self.nvml.mig_mode(h).current
        return mode, sorted((g.profile_id, g.placement.start, g.placement.size)
                            for g in (self.nvml.gpu_instances(h) if mode else []))


def test_a_gpu_moves_whole_to_mig_to_whole_as_pods_come_and_go() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:8", NODE), workdir, strategy="pack")
        await sb.start()
        try:
            sc = MigScenario(sb)
            by_name = {naming.gpu_device_name(g.uuid): g.uuid for g in
                       (sc.nvml.device_info(sc.nvml.device_by_index(i)) for i in range(8))}
            for t in (_template("whole", C.DEVICE_CLASS_GPU),
                      _template("mig-1g", C.DEVICE_CLASS_MIG, "device.attributes['gpu.partita.dev'].migProfile == '1g.10gb'"),
                      _template("mig-3g", C.DEVICE_CLASS_MIG, "device.attributes['gpu.partita.dev'].migProfile == '3g.40gb'")):
                sb.server.create(t)
            # eight whole-GPU pods fill the node
            await sc.run(*(_pod(f"whole-{i}", "whole") for i in range(8)))
            assert all(sc.phase(f"whole-{i}") == "Running" for i in range(8))
            [freed] = sc.devices("whole-3")
            uuid = by_name[freed]
            # one goes; MIG pods arrive and can only use the freed GPU: it turns into MIG devices
            await sc.delete("whole-3")
            await sc.run(*(_pod(f"small-{i}", "mig-1g") for i in range(3)), _pod("medium", "mig-3g"))
            for p in ("small-0", "small-1", "small-2", "medium"):
                assert sc.phase(p) == "Running", sb.report()[0]
                [dev] = sc.devices(p)
                assert dev.startswith(freed + "-mig-"), (p, dev)
            mode, instances = sc.gpu_state(uuid)
            assert mode is True
            # 1g.10gb is profile 19, 3g.40gb profile 9 on H100; the three small ones packed beside the 3g
            assert sorted(p for p, _, _ in instances) == [9, 19, 19, 19]
            assert not any(a[1] < b[1] + b[2] and b[1] < a[1] + a[2] for i, a in enumerate(instances)
                           for b in instances[i + 1:]), f"overlapping placements: {instances}"
            # the other seven GPUs stayed whole
            assert all(sc.gpu_state(u) == (False, []) for u in by_name.values() if u != uuid)
            # the MIG pods go: the GPU leaves MIG mode and is offered whole again
            await sc.delete("small-0", "small-1", "small-2", "medium")
            assert sc.gpu_state(uuid) == (False, [])
            await sc.run(_pod("whole-again", "whole"))
            assert sc.phase("whole-again") == "Running" and sc.devices("whole-again") == [freed]
            assert await sb.delete_workload() == []
        finally:
            assert await sb.stop() == []

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_nine_notebooks_of_10gi_put_eight_on_one_80gb_gpu_and_the_ninth_on_another() -> None:
    r = subprocess.run([sys.executable, "-m", "controller", "sandbox", "--node", "big=A100-SXM4-80GB:2",
                        "-f", str(REPO / "examples" / "shared-notebooks.yaml"), "-o", "json"],
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    pods = json.loads(r.stdout)["pods"]
    assert len(pods) == 9 and all(p["phase"] == "Running" for p in pods), pods
    devices = [d["device"] for p in pods for devs in p["claims"].values() for d in devs]
    counts = sorted((devices.count(d) for d in set(devices)), reverse=True)
    assert counts == [8, 1], devices
    assert all(d.endswith("-shared") for d in devices)
    shares = [d["share"] for p in pods for devs in p["claims"].values() for d in devs]
    assert len(set(shares)) == 9 and all(shares)
