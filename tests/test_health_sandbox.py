"""The GPU health scenario in the sandbox (issue 13 item 7): real plugin processes, the controller, kubelet
stand-ins. A GPU fails under a running pod -> its devices are tainted -> new pods avoid it, the pod's events
say so, `partita explain` for a new claim names the taint; the GPU is reset and recovers -> allocatable
again, without a plugin restart."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from controller.allocator.explain import Explainer, render
from controller.sandbox.main import Sandbox
from driver.api import constants as C
from driver.api import naming
from driver.nvml import profile_from_spec
from driver.nvml.fake import fake_gpu_uuid
from driver.nvml.profile import parse_injection

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
NODE = "node-a"


def _example() -> list[dict]:
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "gpu-health-training.yaml").read_text()) if d]
    return [{**d, "metadata": {**d["metadata"], "namespace": "default"}} for d in docs
            if d["metadata"]["name"] in ("training-gpu", "training")]


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "gpu"}]}}],
                     "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "training-gpu"}]}}


def test_a_gpu_fails_under_a_running_pod_and_recovers(monkeypatch) -> None:
    monkeypatch.setenv("HEALTH_QUIET_PERIOD", "3")
    monkeypatch.setenv("HEALTH_CHECK_INTERVAL", "0.2")
    workdir = Path(tempfile.mkdtemp(prefix="sbx-h-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:2", NODE), workdir)
        await sb.start()
        server = sb.server
        events_file = sb.plugins[0].paths.plugin_dir(sb.driver) / "fake-nvml" / "events.jsonl"

        def devices(pod: str) -> list[str]:
            k = sb.kubelets[0]
            return [d["device"] for devs in k.prepared[f"default/{pod}"].claims.values() for d in devs]

        def phase(pod: str) -> str:
            return ((server.get("pods", pod, "default") or {}).get("status") or {}).get("phase", "")

        def taint(device: str) -> dict | None:
            for s in server.list("resourceslices"):
                for d in s["spec"].get("devices") or []:
                    if d["name"] == device:
                        return next((t for t in d.get("taints") or [] if t["key"] == C.HEALTH_TAINT_KEY), None)
            return None

        def resource_health(pod: str) -> list[tuple[str, str]]:
            st = (server.get("pods", pod, "default") or {}).get("status") or {}
            return [(a["name"], r["health"]) for c in st.get("containerStatuses") or []
                    for a in c.get("allocatedResourcesStatus") or [] for r in a["resources"]]

        def pod_events(pod: str) -> list[dict]:
            return [e for e in server.list("events", "default") if e["involvedObject"].get("name") == pod]

        try:
            for d in _example():
                server.create(d)
            assert await sb.wait_settled(60), sb.report()[0]
            assert phase("training") == "Running"
            [failing] = devices("training")
            gpu_index = next(i for i in range(2) if failing == naming.gpu_device_name(fake_gpu_uuid(NODE, i)))

            # the GPU under the running pod gets a double-bit ECC error
            with open(events_file, "a") as f:
                f.write(parse_injection({"kind": "ecc_dbe", "gpu": gpu_index}).to_json() + "\n")
            await server.wait_for(lambda s: taint(failing) is not None, 15)
            assert (taint(failing)["value"], taint(failing)["effect"]) == ("fatal", "NoExecute")
            await server.wait_for(lambda s: any(e["reason"] == "PartitaDeviceUnhealthy" for e in pod_events("training")), 15)
            [ev] = [e for e in pod_events("training") if e["reason"] == "PartitaDeviceUnhealthy"]
            assert ev["type"] == "Warning" and failing in ev["message"] and "is fatal" in ev["message"]
            assert "device taint eviction" in ev["message"]
            # the kubelet (stand-in) writes what the plugin's health stream says into the pod's status
            await server.wait_for(lambda s: resource_health("training") == [("claim:gpu", "Unhealthy")], 15)

            # new pods avoid it: one gets the other GPU, the next one waits
            server.create(_pod("next-0"))
            server.create(_pod("next-1"))
            assert await sb.wait_settled(60), sb.report()[0]
            # which of the two (created in the same second) runs is the queue's business, not this test's
            running, waiting = sorted(["next-0", "next-1"], key=lambda p: phase(p) != "Running")
            assert (phase(running), phase(waiting)) == ("Running", "Pending")
            assert devices(running) != [failing]
            claim = next(c for c in server.list("resourceclaims", "default", group="resource.k8s.io")
                         if c["metadata"]["name"].startswith(waiting))
            allocated = [c for c in server.list("resourceclaims", group="resource.k8s.io")
                         if (c.get("status") or {}).get("allocation")]
            text = render(Explainer(server.list("resourceslices"), {c["metadata"]["name"]: c for c in
                                                                    server.list("deviceclasses", group="resource.k8s.io")},
                                    allocated).explain(claim))
            assert "health taint gpu.partita.dev/unhealthy=fatal:NoExecute" in text, text

            # the failed pod goes (as the eviction would), an operator resets the GPU: allocatable again
            server.delete("pods", "training", "default")
            await server.wait_for(lambda s: s.get("pods", "training", "default") is None, 30)
            with open(events_file, "a") as f:
                f.write(parse_injection({"kind": "reset", "gpu": gpu_index}).to_json() + "\n")
            await server.wait_for(lambda s: taint(failing) is None, 20)
            await server.wait_for(lambda s: phase(waiting) == "Running", 30)
            assert devices(waiting) == [failing]
            await server.wait_for(lambda s: resource_health(waiting) == [("claim:gpu", "Healthy")], 15)
            assert sb.plugins[0].alive()
            assert await sb.delete_workload() == []
        finally:
            assert await sb.stop() == []

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
