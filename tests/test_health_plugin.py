"""The real plugin process on fake GPUs (issue 13): an injected failure taints the GPU's devices in its
ResourceSlices and turns the prepared device UNHEALTHY on the kubelet's health stream (KEP-4680), served on
the real DRA socket; a reset recovers both after the quiet period, without a plugin restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from controller.sandbox.apiserver import ApiServer
from controller.sandbox.plugin import PluginProcess
from driver.api import constants as C
from driver.api import naming
from driver.fakeinject import add_arguments as inject_arguments
from driver.fakeinject import run as inject_run
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubeletapi.drahealth.v1 import api_pb2 as hpb
from driver.kubeletapi.drahealth.v1 import api_pb2_grpc as hpb_grpc
from driver.kubeletapi.pluginregistration.v1 import api_pb2 as reg
from driver.kubeletapi.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from driver.nvml import profile_from_spec
from driver.nvml.fake import fake_gpu_uuid
from tests.support.claims import allocated_claim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:2", NODE)
ENV = {"HEALTH_QUIET_PERIOD": "2", "HEALTH_CHECK_INTERVAL": "0.2"}


def _health_taints(server: ApiServer, device: str) -> list[dict]:
    for s in server.list("resourceslices"):
        for d in s["spec"].get("devices") or []:
            if d["name"] == device:
                return [t for t in d.get("taints") or [] if t["key"] == C.HEALTH_TAINT_KEY]
    return []


async def _until(predicate, timeout: float = 20.0, what: str = "condition") -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _inject(events: Path, *argv: str) -> int:
    import argparse

    p = argparse.ArgumentParser()
    inject_arguments(p)
    return inject_run(p.parse_args(["--events", str(events), *argv]))


def test_failure_and_recovery_reach_the_slices_and_the_kubelet_health_stream() -> None:
    async def main():
        root = Path(tempfile.mkdtemp(prefix="health-", dir="/tmp"))
        server = ApiServer()
        url = await server.start()
        server.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
        plugin = PluginProcess(PROFILE, PROFILE.nodes[0], root, url, DRIVER, "DEBUG", env=ENV)
        try:
            plugin.start()
            await plugin.wait_ready()
            plugin_dir = plugin.paths.plugin_dir(DRIVER)
            events = plugin_dir / "fake-nvml" / "events.jsonl"
            gpu = naming.gpu_device_name(fake_gpu_uuid(NODE, 0))
            shared, mig = naming.shared_device_name(gpu), naming.mig_device_name(gpu, "1g.10gb", 0)
            await _until(lambda: any(True for _ in server.list("resourceslices")), what="slices")
            async with grpc.aio.insecure_channel(f"unix://{plugin.paths.registration_socket(DRIVER)}") as ch:
                info = await reg_grpc.RegistrationStub(ch).GetInfo(reg.InfoRequest(), timeout=10)
            assert list(info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin", "v1.DRAResourceHealth",
                                                     "v1alpha1.DRAResourceHealth"]
            claim = server.create(allocated_claim("train", [gpu]))
            async with grpc.aio.insecure_channel(f"unix://{plugin_dir / 'dra.sock'}") as ch:
                md = claim["metadata"]
                resp = await v1_grpc.DRAPluginStub(ch).NodePrepareResources(v1.NodePrepareResourcesRequest(
                    claims=[v1.Claim(namespace=md["namespace"], name=md["name"], uid=md["uid"])]), timeout=20)
                assert resp.claims[md["uid"]].error == ""
                stream = hpb_grpc.DRAResourceHealthStub(ch).NodeWatchResources(hpb.NodeWatchResourcesRequest())
                first = await asyncio.wait_for(stream.read(), 10)
                assert [(d.device.pool_name, d.device.device_name, d.health) for d in first.devices] == \
                    [(NODE, gpu, hpb.HEALTHY)]
                assert first.devices[0].health_check_timeout_seconds == 30
                # the older kubelets' v1alpha1 service answers the same on the wire
                old = ch.unary_stream("/v1alpha1.DRAResourceHealth/NodeWatchResources",
                                      request_serializer=hpb.NodeWatchResourcesRequest.SerializeToString,
                                      response_deserializer=hpb.NodeWatchResourcesResponse.FromString)(
                    hpb.NodeWatchResourcesRequest())
                assert (await asyncio.wait_for(old.read(), 10)).devices[0].device.device_name == gpu
                old.cancel()

                # bad input first: named in the log, the plugin keeps running
                with open(events, "a") as f:
                    f.write('{"kind": "meltdown", "gpu": 0}\n{"kind": "xid", "gpu": 9, "xid": 79}\n')
                assert _inject(events, "--kind", "fallen_off_bus", "--gpu", "0") == 0
                taken = await _until(lambda: _health_taints(server, gpu), what="the health taint")
                print(f"XID to published taint: {taken:.3f}s")
                for name in (gpu, shared, mig):
                    (t,) = _health_taints(server, name)
                    assert (t["value"], t["effect"]) == ("lost", "NoExecute")
                assert _health_taints(server, naming.gpu_device_name(fake_gpu_uuid(NODE, 1))) == []
                assert taken < 5
                bad = await asyncio.wait_for(stream.read(), 10)
                assert bad.devices[0].health == hpb.UNHEALTHY and bad.devices[0].message.startswith("lost: ")
                assert plugin.alive()
                log = plugin.paths.log.read_text()
                assert "line 1: unknown health event kind 'meltdown'" in log and "has no GPU 9" in log

                assert _inject(events, '{"kind": "reset", "gpu": 0}') == 0
                while True:
                    msg = await asyncio.wait_for(stream.read(), 15)
                    if msg.devices[0].health == hpb.HEALTHY:
                        break
                await _until(lambda: not _health_taints(server, gpu), what="the taint to go")
                assert not _health_taints(server, mig)
                stream.cancel()
            assert plugin.alive()
        finally:
            plugin.stop()
            await server.stop()
            shutil.rmtree(root, ignore_errors=True)

    asyncio.run(main())


def test_fake_inject_refuses_bad_events_and_writes_nothing(tmp_path, capsys) -> None:
    events = tmp_path / "e.jsonl"
    prof = tmp_path / "p.yaml"
    prof.write_text(json.dumps(PROFILE.model_dump(by_alias=True, mode="json")))
    assert _inject(events, "--kind", "xid", "--gpu", "0") == 2
    assert "without an xid number" in capsys.readouterr().err
    assert _inject(events, "--kind", "reset", "--gpu", "5", "--fake-profile", str(prof), "--node-name", NODE) == 2
    assert "has no GPU 5" in capsys.readouterr().err
    assert not events.exists()
    assert _inject(events, "--kind", "xid", "--gpu", "1", "--xid", "48") == 0
    assert json.loads(events.read_text()) == {"gpu": 1, "kind": "xid", "xid": 48}


@pytest.mark.parametrize("argv, error", [
    (["--health-taint-effects", "degraded=Evict"], "STATE=EFFECT"),
    (["--health-ignore-xids", "13,x"], "'x' is not an XID number"),
    (["--health-quiet-period", "-1"], "negative"),
])
def test_bad_health_flags_are_refused_with_the_flag_named(argv, error, capsys) -> None:
    import argparse

    from driver.plugin.main import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--node-name", NODE, *argv])) == 2
    assert error in capsys.readouterr().err
