"""Issue 14, done when (node side): in the sandbox, a notebook with injected low utilization shows as idle in
its claim's status.devices, in the metrics and in an Event on its pod; a busy pod shows its utilization;
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
from driver.api import naming
from driver.nvml import open_backend, profile_from_spec

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


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "gpu"}]}}],
                     "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "whole"}]}}


def test_a_notebook_with_low_load_is_reported_idle_and_a_busy_pod_shows_its_utilization() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sbx-usage-", dir="/tmp"))
    port = _free_port()

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:2", NODE), workdir,
                     plugin_env={"USAGE_INTERVAL": "0.3", "IDLE_THRESHOLD": "0.1", "IDLE_PERIOD": "1.5",
                                 "METRICS_PORT": str(port), "METRICS_ADDRESS": "127.0.0.1"})
        await sb.start()
        try:
            server = sb.server
            server.create({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                           "metadata": {"name": "whole", "namespace": "default"},
                           "spec": {"spec": {"devices": {"requests": [
                               {"name": "gpu", "exactly": {"deviceClassName": C.DEVICE_CLASS_GPU}}]}}}})
            server.create(_pod("notebook"))
            server.create(_pod("trainer"))
            assert await sb.wait_settled(60), sb.report()[0]
            nvml = open_backend("fake", profile=sb.profile, node_name=NODE,
                                state_dir=sb.plugins[0].paths.plugin_dir(sb.driver) / "fake-nvml")
            nvml.init()
            uuid_of = {naming.gpu_device_name(nvml.device_info(nvml.device_by_index(i)).uuid):
                       nvml.device_info(nvml.device_by_index(i)).uuid for i in range(2)}

            def claim_of(pod: str) -> dict:
                return next(c for c in server.list("resourceclaims", "default", group="resource.k8s.io")
                            if any(r.get("name") == pod for r in (c.get("status") or {}).get("reservedFor") or []))

            def entry(pod: str) -> dict | None:
                devices = (claim_of(pod).get("status") or {}).get("devices") or []
                return devices[0] if devices else None

            await server.wait_for(lambda s: entry("notebook") and entry("trainer"), 20)
            gpu = {p: uuid_of[entry(p)["device"]] for p in ("notebook", "trainer")}
            assert entry("trainer")["data"]["gpuUUID"] == gpu["trainer"]
            nvml.set_process_load(gpu["notebook"], 4001, sm_util=2, memory_used_bytes=2 << 30)
            nvml.set_process_load(gpu["trainer"], 4002, sm_util=90, memory_used_bytes=60 << 30)

            def idle(pod: str) -> str | None:
                e = entry(pod) or {}
                return next((c["status"] for c in e.get("conditions") or [] if c["type"] == "Idle"), None)

            await server.wait_for(lambda s: idle("notebook") == "True", 30)
            [cond] = [c for c in entry("notebook")["conditions"] if c["type"] == "Idle"]
            assert cond["reason"] == "BelowThreshold" and "below 10%" in cond["message"]
            assert idle("trainer") is None                         # busy: never judged idle
            await server.wait_for(lambda s: any(e["reason"] == "GpuClaimIdle" for e in s.list("events", "default")), 10)
            idle_events = [e for e in server.list("events", "default") if e["reason"] == "GpuClaimIdle"]
            assert [e["involvedObject"]["name"] for e in idle_events] == ["notebook"]

            samples = _scrape(port)
            nb, tr = claim_of("notebook")["metadata"]["name"], claim_of("trainer")["metadata"]["name"]
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
