"""Issue 14, done when (node side): in the sandbox, a notebook with injected low utilization shows as idle in
its claim's status.devices, in the metrics and in an Event on its pod; a busy pod shows its utilization; two shares
of one GPU get their own processes (fake process table with the CDI environment);
deleting the workload removes every usage series."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.sandbox.main import Sandbox
from driver.api import constants as C
from controller.sandbox.usagefeed import ANNOTATION_MEMORY, ANNOTATION_UTILIZATION
from driver.nvml import profile_from_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NODE = "node-a"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> list:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples, name: str, **labels) -> float | None:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def _pod(name: str, template: str, utilization: int, memory: str = "1Gi") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default",
                         "annotations": {ANNOTATION_UTILIZATION: str(utilization), ANNOTATION_MEMORY: memory}},
            "spec": {"containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "gpu"}]}}],
                     "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": template}]}}


def _template(name: str, cls: str, memory: str | None = None) -> dict:
    exactly: dict = {"deviceClassName": cls}
    if memory:
        exactly["capacity"] = {"requests": {"memory": memory}}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}}


def test_a_notebook_with_low_load_is_reported_idle_and_a_busy_pod_shows_its_utilization() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sbx-usage-", dir="/tmp"))
    port = _free_port()

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:3", NODE), workdir,
                     plugin_env={"USAGE_INTERVAL": "0.3", "IDLE_THRESHOLD": "0.1", "IDLE_PERIOD": "1.5",
                                 "METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
        await sb.start()
        try:
            server = sb.server
            server.create(_template("whole", C.DEVICE_CLASS_GPU))
            server.create(_template("share", C.DEVICE_CLASS_SHARED, "10Gi"))
            # the sandbox's usage feed gives each pod's annotated load to the fake GPUs of its devices
            server.create(_pod("notebook", "whole", 2, "2Gi"))
            server.create(_pod("trainer", "whole", 90, "60Gi"))
            server.create(_pod("share-a", "share", 3))
            server.create(_pod("share-b", "share", 50, "4Gi"))
            assert await sb.wait_settled(60), sb.report()[0]

            def claim_of(pod: str) -> dict:
                return next(c for c in server.list("resourceclaims", "default", group="resource.k8s.io")
                            if any(r.get("name") == pod for r in (c.get("status") or {}).get("reservedFor") or []))

            def entry(pod: str) -> dict | None:
                devices = (claim_of(pod).get("status") or {}).get("devices") or []
                return devices[0] if devices else None

            pods = ("notebook", "trainer", "share-a", "share-b")
            await server.wait_for(lambda s: all(entry(p) for p in pods), 20)
            gpu = {p: entry(p)["data"]["gpuUUID"] for p in pods}
            assert gpu["share-a"] == gpu["share-b"] and len({gpu["notebook"], gpu["trainer"], gpu["share-a"]}) == 3

            def idle(pod: str) -> str | None:
                e = entry(pod) or {}
                return next((c["status"] for c in e.get("conditions") or [] if c["type"] == "Idle"), None)

            await server.wait_for(lambda s: idle("notebook") == "True" and idle("share-a") == "True", 30)
            [cond] = [c for c in entry("notebook")["conditions"] if c["type"] == "Idle"]
            assert cond["reason"] == "BelowThreshold" and "below 10%" in cond["message"]
            assert idle("trainer") is None and idle("share-b") is None     # busy: never judged idle
            await server.wait_for(lambda s: len([e for e in s.list("events", "default")
                                                 if e["reason"] == "GpuClaimIdle"]) == 2, 10)
            idle_events = [e for e in server.list("events", "default") if e["reason"] == "GpuClaimIdle"]
            assert sorted(e["involvedObject"]["name"] for e in idle_events) == ["notebook", "share-a"]

            samples = _scrape(port)
            nb, tr = claim_of("notebook")["metadata"]["name"], claim_of("trainer")["metadata"]["name"]
            sa, sb_ = claim_of("share-a")["metadata"]["name"], claim_of("share-b")["metadata"]["name"]
            # the shared GPU's two processes told apart by their CDI environment in the fake process table
            assert _value(samples, "partita_gpu_utilization_ratio", claim_name=sa, mode="shared") == pytest.approx(0.03)
            assert _value(samples, "partita_gpu_utilization_ratio", claim_name=sb_, mode="shared") == pytest.approx(0.5)
            assert _value(samples, "partita_gpu_memory_used_bytes", claim_name=sb_) == 4 << 30
            assert _value(samples, "partita_gpu_memory_allocated_bytes", claim_name=sb_) == 10 << 30
            assert _value(samples, "partita_claim_idle", claim_name=sa) == 1
            assert _value(samples, "partita_claim_idle", claim_name=sb_) == 0
            assert _value(samples, "partita_claim_idle", claim_name=nb, pod_name="notebook") == 1
            assert _value(samples, "partita_claim_idle", claim_name=tr, pod_name="trainer") == 0
            assert _value(samples, "partita_gpu_utilization_ratio", claim_name=tr, mode="whole") == pytest.approx(0.9)
            assert _value(samples, "partita_gpu_memory_used_bytes", claim_name=tr) == 60 << 30
            assert _value(samples, "partita_gpu_utilization_ratio", claim_name=nb) == pytest.approx(0.02)
            assert _value(samples, "partita_gpu_device_info", claim_name=tr, gpu_uuid=gpu["trainer"]) == 1

            assert await sb.delete_workload() == []
            after = _scrape(port)
            for name in ("partita_gpu_utilization_ratio", "partita_gpu_memory_used_bytes",
                         "partita_gpu_memory_allocated_bytes", "partita_gpu_device_info", "partita_claim_idle"):
                assert [s for s in after if s.name == name] == [], name
        finally:
            assert await sb.stop() == []

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
