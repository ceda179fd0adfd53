"""``partita status`` (issue 14 items 5 and 4): capacity by node and mode, usage from metrics, idle claims,
pending pods with their reason; the same numbers as the controller's gauges; the sandbox's view."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator

import pytest
import yaml
from aiohttp import web
from prometheus_client import REGISTRY

from controller import status
from controller.cli import build_parser
from controller.operator import capacity as cap
from controller.operator.controller import ControllerConfig
from controller.sandbox.apiserver import ApiServer
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from tests.support.claims import allocated_claim
from tests.support.cluster import claim, cluster, node_slices, pod, request

REPO = Path(__file__).resolve().parents[1]
GI = 2**30
CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
SHARE = "7f0c4bc8-8d0c-4a53-9d55-0e1e6b0d0d01"


def _labels(node: str, device: str, claim_name: str, pod_name: str, mode: str = "shared") -> str:
    return (f'node="{node}",device="{device}",uuid="GPU-x",mode="{mode}",claim_namespace="default",'
            f'claim_name="{claim_name}",pod_namespace="default",pod_name="{pod_name}"')


def metrics_text(node: str, device: str) -> str:
    busy, idle = _labels(node, device, "busy", "busy-pod"), _labels(node, device, "nb", "notebook")
    return "\n".join([
        "# HELP partita_gpu_utilization_ratio GPU utilization of a claim's device (0..1)",
        "# TYPE partita_gpu_utilization_ratio gauge",
        f"partita_gpu_utilization_ratio{{{busy}}} 0.9",
        f"partita_gpu_utilization_ratio{{{idle}}} 0.01",
        "# TYPE partita_gpu_memory_used_bytes gauge",
        f"partita_gpu_memory_used_bytes{{{busy}}} {20 * GI}",
        f"partita_gpu_memory_used_bytes{{{idle}}} {1 * GI}",
        "# TYPE partita_gpu_memory_allocated_bytes gauge",
        f"partita_gpu_memory_allocated_bytes{{{busy}}} {30 * GI}",
        "# TYPE partita_claim_idle gauge",
        f'partita_claim_idle{{node="{node}",claim_namespace="default",claim_name="nb",pod_namespace="default",'
        'pod_name="notebook"} 1',
        "# TYPE partita_device_health gauge",
        f'partita_device_health{{node="{node}",device="{device}",uuid="GPU-x",state="healthy"}} 1',
        f'partita_device_health{{node="{node}",device="gpu-other",uuid="GPU-y",state="lost"}} 1',
        ""])


def idle_condition(c: dict, device: str) -> dict:
    c = json.loads(json.dumps(c))
    c.setdefault("status", {})["devices"] = [{
        "driver": C.DEFAULT_DRIVER_NAME, "pool": "node-a", "device": device, "shareID": SHARE,
        "conditions": [{"type": "Idle", "status": "True", "reason": "BelowThreshold",
                        "message": "utilization below 5% for 30m", "lastTransitionTime": "2026-12-07T10:00:00Z",
                        "observedGeneration": 1}]}]
    return c


def test_usage_idle_claims_and_health_come_from_metrics_and_claim_status() -> None:
    slices = node_slices("node-a", "A100-SXM4-80GB:1")
    shared = next(d["name"] for s in slices for d in s["spec"].get("devices") or [] if d["name"].endswith("-shared"))
    nb = idle_condition(allocated_claim("nb", [shared], share_ids={shared: SHARE}, share_memory="10Gi"), shared)
    busy = allocated_claim("busy", [shared], share_ids={shared: SHARE.replace("1", "2")}, share_memory="30Gi")
    idle_by_metric = allocated_claim("other", [shared], share_ids={shared: SHARE.replace("1", "3")})
    usage = status.Usage()
    status.parse_metrics(metrics_text("node-a", shared), usage, "test")
    usage.idle["default/other"] = {"node": "node-a", "pod_namespace": "default", "pod_name": "other-pod"}
    doc = status.build(status.Snapshot(slices, [nb, busy, idle_by_metric], [], CLASSES), usage)
    node = doc["nodes"]["node-a"]
    assert node["gpus"] == 1 and node["inUse"] == {"whole": 0, "mig": 0, "shared": 1}
    assert node["memoryBytes"] == {"total": 80 * GI, "allocated": 50 * GI}
    assert node["usage"]["utilization"] == pytest.approx(0.455)
    assert node["usage"]["memoryUsedBytes"] == 21 * GI
    idle = {i["claim"]: i for i in doc["idleClaims"]}
    assert set(idle) == {"default/nb", "default/other"}
    assert idle["default/nb"]["devices"] == [shared] and idle["default/nb"]["pod"] == "default/notebook"
    assert idle["default/nb"]["since"] == "2026-12-07T10:00:00Z" and idle["default/other"]["node"] == "node-a"
    assert doc["unhealthyDevices"] == [{"node": "node-a", "device": "gpu-other", "uuid": "GPU-y", "state": "lost"}]
    table = status.render(doc, wide=True)
    assert "busy-pod" in table and "90%" in table and "Idle claims (2):" in table and "lost" in table
    assert "utilization below 5% for 30m" in table


def test_bad_metrics_text_is_a_warning_naming_the_source() -> None:
    usage = status.Usage()
    status.parse_metrics("partita_gpu_utilization_ratio{node=\"a\" 1\n", usage, "http://x/metrics")
    assert usage.errors and usage.errors[0].startswith("http://x/metrics: not Prometheus text format")
    assert usage.sources == []


def _args(*argv: str):  # noqa: ANN202
    return build_parser(["status", *argv]).parse_args(["status", *argv])


def _status_json(url: str, *extra: str) -> dict:
    out = io.StringIO()
    assert status.run(_args("--kube-api", url, "-o", "json", *extra), out) == 0
    return json.loads(out.getvalue())


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _matches_gauges(doc: dict) -> bool:
    for node, n in doc["nodes"].items():
        for mode, m in n["modes"].items():
            for st in cap.STATES:
                if _gauge("partita_capacity_gpus", node=node, mode=mode, state=st) != m["gpus"][st]:
                    return False
                if _gauge("partita_capacity_memory_bytes", node=node, mode=mode, state=st) != m["memoryBytes"][st]:
                    return False
            if _gauge("partita_capacity_fragmented_memory_bytes", node=node, mode=mode) != \
                    m["fragmented"]["memoryBytes"]:
                return False
    return all(_gauge("partita_pending_claims_by_reason", reason=r) == n
               for r, n in doc["pendingClaimsByReason"].items())


@pytest.mark.timeout(90)
def test_status_shows_the_numbers_the_controller_exports() -> None:
    async def main() -> None:
        cfg = ControllerConfig(retry_min=0.2, retry_max=2.0, capacity_refresh_seconds=0.2)
        async with cluster(cfg) as cl:
            cl.add_node("node-s1", "A100-SXM4-80GB:2")
            cl.add_node("node-s2", "L4:1")
            cl.submit(pod("whole", ["w"]), claim("w", [request()]))
            cl.submit(pod("share", ["s"]), claim("s", [request(cls=C.DEVICE_CLASS_SHARED,
                                                               capacity={"requests": {"memory": "30Gi"}})]))
            await cl.allocated("w")
            await cl.allocated("s")
            cl.submit(pod("big", ["b"]), claim("b", [request(count=4)]))
            await cl.event("PartitaUnschedulable", 20)
            loop = asyncio.get_running_loop()
            doc = await loop.run_in_executor(None, _status_json, cl.server.url)
            assert doc["total"]["gpus"] == 3
            assert sum(n["inUse"]["whole"] for n in doc["nodes"].values()) == 1
            assert sum(n["inUse"]["shared"] for n in doc["nodes"].values()) == 1
            assert doc["pendingClaimsByReason"]["InsufficientCapacity"] == 1
            [big] = doc["pendingPods"]
            assert big["pod"] == "default/big" and big["claims"] == ["default/b"]
            assert "cannot allocate" in big["message"]                 # the controller's Event
            await cl.server.wait_for(lambda _: _matches_gauges(doc) or None, 10)
            as_yaml = yaml.safe_load(await loop.run_in_executor(None, _run_table, cl.server.url, "-o", "yaml"))
            assert as_yaml["pendingClaimsByReason"] == doc["pendingClaimsByReason"] and as_yaml["total"] == doc["total"]
            text = await loop.run_in_executor(None, lambda: _run_table(cl.server.url))
            assert "default/big" in text and "InsufficientCapacity" in text and "Pending pods (1):" in text
    asyncio.run(main())


def _run_table(url: str, *extra: str) -> str:
    out = io.StringIO()
    assert status.run(_args("--kube-api", url, *extra), out) == 0
    return out.getvalue()


@contextlib.asynccontextmanager
async def metrics_server(text: str) -> AsyncIterator[str]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]      # noqa: SLF001 - the port the OS chose
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


def _emulator_with(objects: list[dict]) -> ApiServer:
    server = ApiServer()
    for c in device_classes():
        server.create(c)
    for o in objects:
        server.create(o)
    return server


def test_cli_against_an_api_server_with_metrics_and_an_unreachable_metrics_url() -> None:
    async def main() -> None:
        slices = node_slices("node-a", "A100-SXM4-80GB:1")
        shared = next(d["name"] for s in slices for d in s["spec"].get("devices") or [] if d["name"].endswith("-shared"))
        server = _emulator_with(slices)
        await server.start()
        try:
            async with metrics_server(metrics_text("node-a", shared)) as url:
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                cmd = [sys.executable, "-m", "controller.cli", "status", "--kube-api", server.url, "-o", "wide",
                       "--metrics-url", url, "--metrics-url", "http://127.0.0.1:9/metrics"]
                proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                            env=env)
                out, err = await asyncio.wait_for(proc.communicate(), 60)
                text = out.decode()
                assert proc.returncode == 0, err.decode()
                assert "busy-pod" in text and "90%" in text
                assert "warning: http://127.0.0.1:9/metrics: cannot fetch metrics" in text
        finally:
            await server.stop()
    asyncio.run(main())


def test_an_unreachable_api_server_is_one_clear_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "controller.cli", "status", "--kube-api", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert proc.stderr.startswith("partita status: cannot reach the API server") or \
        "partita status: listing" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_refreshes_until_interrupted() -> None:
    async def main() -> None:
        server = _emulator_with(node_slices("node-a", "L4:1"))
        await server.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller.cli", "status", "--kube-api", server.url, "-o", "json",
                "--watch", "0.2", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            docs = []
            while len(docs) < 2:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line, (await proc.stderr.read()).decode()
                docs.append(json.loads(line))
            server.create(pod("late", ["nothing"]))
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
            assert proc.returncode == 0
            assert all(d["total"]["gpus"] == 1 for d in docs)
            assert b"Traceback" not in await proc.stderr.read()
        finally:
            await server.stop()
    asyncio.run(main())


def test_watch_interval_is_checked() -> None:
    with pytest.raises(SystemExit):
        _args("--watch", "never")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_sandbox_view_shows_idle_notebooks_and_a_busy_pod() -> None:
    from controller.sandbox.main import Sandbox
    from driver.nvml import profile_from_spec

    workdir = Path(tempfile.mkdtemp(prefix="sbx-status-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("A100-SXM4-80GB:1", "node-a"), workdir, strategy="pack")
        await sb.start()
        try:
            tmpl = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                    "metadata": {"name": "share", "namespace": "default"},
                    "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
                        "deviceClassName": C.DEVICE_CLASS_SHARED, "capacity": {"requests": {"memory": "10Gi"}}}}]}}}}
            sb.server.create(tmpl)
            for name in ("notebook", "busy-pod"):
                sb.server.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                                  "spec": {"containers": [{"name": "app", "image": "busybox",
                                                           "resources": {"claims": [{"name": "gpu"}]}}],
                                           "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "share"}]}})
            assert await sb.wait_settled(60), sb.report()[0]
            claims = {c["status"]["reservedFor"][0]["name"]: c
                      for c in sb.server.list("resourceclaims", group="resource.k8s.io")}
            nb = claims["notebook"]
            [res] = nb["status"]["allocation"]["devices"]["results"]
            # what the node side writes for an idle claim (KEP-4817 AllocatedDeviceStatus)
            nb["status"]["devices"] = [{"driver": res["driver"], "pool": res["pool"], "device": res["device"],
                                        "shareID": res.get("shareID"),
                                        "conditions": [{"type": "Idle", "status": "True", "reason": "BelowThreshold",
                                                        "message": "below 5% for 30m", "observedGeneration": 1,
                                                        "lastTransitionTime": "2026-12-07T10:00:00Z"}]}]
            sb.server.update_status(nb)
            busy = claims["busy-pod"]
            text = metrics_text("node-a", res["device"]).replace('claim_name="busy"',
                                                                 f'claim_name="{busy["metadata"]["name"]}"')
            # the sandbox's plugins serve their metrics on 127.0.0.1 (with the node side's usage series, where
            # the fake NVML's injected load shows); the busy pod's series are given here as the node side
            # exports them, from a second URL
            [plugin_url] = [p.metrics_url for p in sb.plugins]
            async with metrics_server(text) as url:
                loop = asyncio.get_running_loop()
                flags = ("--metrics-url", plugin_url, "--metrics-url", url)
                doc = await loop.run_in_executor(None, _status_json, sb.server.url, *flags)
                table = await loop.run_in_executor(None, _run_table, sb.server.url, *flags, "-o", "wide")
            assert doc["metrics"] == {"sources": [plugin_url, url], "errors": []}
            assert doc["nodes"]["node-a"]["inUse"]["shared"] == 1
            assert doc["nodes"]["node-a"]["memoryBytes"]["allocated"] == 20 * GI
            [idle] = [i for i in doc["idleClaims"] if i["claim"] == f"default/{nb['metadata']['name']}"]
            assert idle["pod"] == "default/notebook" and idle["node"] == "node-a" and idle["devices"] == [res["device"]]
            [u] = [u for u in doc["usage"] if u["claim"] == f"default/{busy['metadata']['name']}"]
            assert u["utilization"] == 0.9 and u["pod"] == "default/busy-pod"
            assert (u["memoryUsedBytes"], u["memoryAllocatedBytes"], u["mode"]) == (20 * GI, 30 * GI, "shared")
            assert "below 5% for 30m" in table and "90%" in table
            assert await sb.delete_workload() == []
        finally:
            assert await sb.stop() == []
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_pending_pods_take_kube_schedulers_message_and_an_empty_cluster_says_what_to_check() -> None:
    slices = node_slices("node-a", "L4:1")
    waiting = dict(pod("p", ["c"]), status={"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 cannot allocate all claims."}]})
    c = claim("c", [request(count=2)])
    doc = status.build(status.Snapshot(slices, [c], [waiting], CLASSES), status.Usage())
    assert doc["pendingPods"] == [{"pod": "default/p", "reason": "InsufficientCapacity", "claims": ["default/c"],
                                   "message": "0/1 nodes are available: 1 cannot allocate all claims."}]
    empty = status.render(status.build(status.Snapshot([], [], [], CLASSES), status.Usage()))
    assert "No GPUs published by driver gpu.partita.dev" in empty


def test_the_sandbox_status_shows_an_idle_notebook_and_a_busy_trainer_end_to_end() -> None:
    """Issue 14, done when: notebooks with injected low utilization show as idle in `partita status`, a busy pod
    shows its utilization; here from the real plugin's sampling of the fake NVML's injected load."""
    from controller.sandbox.main import Sandbox
    from driver.api import naming
    from driver.nvml import open_backend, profile_from_spec

    workdir = Path(tempfile.mkdtemp(prefix="sbx-status-e2e-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:2", "node-a"), workdir,
                     plugin_env={"USAGE_INTERVAL": "0.3", "IDLE_THRESHOLD": "0.1", "IDLE_PERIOD": "1.5"})
        await sb.start()
        try:
            server = sb.server
            server.create({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                           "metadata": {"name": "whole", "namespace": "default"},
                           "spec": {"spec": {"devices": {"requests": [
                               {"name": "gpu", "exactly": {"deviceClassName": C.DEVICE_CLASS_GPU}}]}}}})
            for name in ("notebook", "trainer"):
                server.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
                               "spec": {"containers": [{"name": "app", "image": "busybox",
                                                        "resources": {"claims": [{"name": "gpu"}]}}],
                                        "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "whole"}]}})
            assert await sb.wait_settled(60), sb.report()[0]
            nvml = open_backend("fake", profile=sb.profile, node_name="node-a",
                                state_dir=sb.plugins[0].paths.plugin_dir(sb.driver) / "fake-nvml")
            nvml.init()
            uuid_of = {naming.gpu_device_name(i.uuid): i.uuid
                       for i in (nvml.device_info(nvml.device_by_index(n)) for n in range(2))}

            def claim_of(pod: str) -> dict:
                return next(c for c in server.list("resourceclaims", "default", group="resource.k8s.io")
                            if any(r.get("name") == pod for r in (c.get("status") or {}).get("reservedFor") or []))

            device = {p: claim_of(p)["status"]["allocation"]["devices"]["results"][0]["device"]
                      for p in ("notebook", "trainer")}
            nvml.set_process_load(uuid_of[device["notebook"]], 4001, sm_util=2, memory_used_bytes=2 << 30)
            nvml.set_process_load(uuid_of[device["trainer"]], 4002, sm_util=90, memory_used_bytes=60 << 30)
            url = sb.plugins[0].metrics_url
            loop = asyncio.get_running_loop()

            async def status_now() -> dict:
                return await loop.run_in_executor(None, _status_json, server.url, "--metrics-url", url)

            doc: dict = {}
            for _ in range(100):                     # until the plugin has judged the notebook idle
                doc = await status_now()
                if doc["idleClaims"] and any(u["utilization"] for u in doc["usage"] if u["pod"] == "default/trainer"):
                    break
                await asyncio.sleep(0.3)
            nb, tr = claim_of("notebook")["metadata"]["name"], claim_of("trainer")["metadata"]["name"]
            assert [(i["claim"], i["pod"], i["node"]) for i in doc["idleClaims"]] == \
                [(f"default/{nb}", "default/notebook", "node-a")]
            usage = {u["pod"]: u for u in doc["usage"]}
            assert usage["default/trainer"]["utilization"] == pytest.approx(0.9)
            assert usage["default/trainer"]["memoryUsedBytes"] == 60 << 30
            assert usage["default/notebook"]["utilization"] == pytest.approx(0.02)
            assert doc["nodes"]["node-a"]["inUse"]["whole"] == 2 and doc["metrics"]["errors"] == []
            table = await loop.run_in_executor(None, _run_table, server.url, "--metrics-url", url, "-o", "wide")
            assert "Idle claims (1):" in table and "90%" in table and f"default/{tr}" in table
            assert await sb.delete_workload() == []
        finally:
            assert await sb.stop() == []
    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
