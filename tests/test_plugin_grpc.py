"""The plugin as the kubelet talks to it: real unix sockets, registration, DRA v1 and v1beta1."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from driver.api import naming
from driver.inventory import discover
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubeletapi.dra.v1beta1 import api_pb2 as v1beta1
from driver.kubeletapi.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from driver.kubeletapi.pluginregistration.v1 import api_pb2 as reg
from driver.kubeletapi.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.health import check_sockets
from driver.plugin.prepare import DeviceState
from driver.plugin.server import DraService, PluginServers
from tests.support.claims import FakeClaims, allocated_claim

NODE = "node-a"


def _plugin(tmp_path, claims: FakeClaims):
    backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:2", NODE), node_name=NODE)
    backend.init()
    inv = discover(backend, NODE)
    state = DeviceState(driver_name="gpu.partita.dev", node_name=NODE, backend=backend, inventory=inv,
                        cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "plugins" / "gpu.partita.dev",
                        cdi_search_dirs=[])
    servers = PluginServers(DraService(state, claims), driver_name="gpu.partita.dev",
                            dra_socket=tmp_path / "plugins" / "gpu.partita.dev" / "dra.sock",
                            registration_socket=tmp_path / "registry" / "gpu.partita.dev-reg.sock")
    return servers, inv


def test_registration_prepare_and_unprepare_over_unix_sockets(tmp_path) -> None:
    async def scenario():
        claims = FakeClaims()
        servers, inv = _plugin(tmp_path, claims)
        # a stale socket file from a previous run is replaced, not an error
        servers.dra_socket.parent.mkdir(parents=True)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(servers.dra_socket))
        stale.close()
        await servers.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{servers.registration_socket}") as ch:
                info = await reg_grpc.RegistrationStub(ch).GetInfo(reg.InfoRequest())
                assert (info.type, info.name, info.endpoint) == ("DRAPlugin", "gpu.partita.dev", str(servers.dra_socket))
                assert list(info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
                await reg_grpc.RegistrationStub(ch).NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True))
                with pytest.raises(grpc.aio.AioRpcError, match="failed registration process: nope"):
                    await reg_grpc.RegistrationStub(ch).NotifyRegistrationStatus(
                        reg.RegistrationStatus(plugin_registered=False, error="nope"))
            shared = naming.shared_device_name(naming.gpu_device_name(inv.gpus[1].uuid))
            whole = allocated_claim("whole", [naming.gpu_device_name(inv.gpus[0].uuid)], request="gpu/fast")
            share = allocated_claim("share", [shared], request="nb",
                                    share_ids={shared: "0f0f0f0f-1111-2222-3333-444444444444"})
            claims.add(whole)
            claims.add(share)
            async with grpc.aio.insecure_channel(f"unix://{servers.dra_socket}") as ch:
                stub = v1_grpc.DRAPluginStub(ch)
                req = v1.NodePrepareResourcesRequest(claims=[
                    v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in (whole, share)] + [v1.Claim(namespace="default", name="gone", uid="u-gone")])
                resp = await stub.NodePrepareResources(req)
                assert set(resp.claims) == {whole["metadata"]["uid"], share["metadata"]["uid"], "u-gone"}
                w = resp.claims[whole["metadata"]["uid"]]
                assert w.error == "" and list(w.devices[0].request_names) == ["gpu"]
                assert not w.devices[0].HasField("share_id")
                s = resp.claims[share["metadata"]["uid"]].devices[0]
                assert s.share_id == "0f0f0f0f-1111-2222-3333-444444444444"
                assert "does not exist" in resp.claims["u-gone"].error
                empty = await stub.NodePrepareResources(v1.NodePrepareResourcesRequest())
                assert len(empty.claims) == 0
                # v1beta1: same devices, no share_id field at all
                beta = await v1beta1_grpc.DRAPluginStub(ch).NodePrepareResources(v1beta1.NodePrepareResourcesRequest(
                    claims=[v1beta1.Claim(namespace="default", name="share", uid=share["metadata"]["uid"])]))
                assert beta.claims[share["metadata"]["uid"]].devices[0].device_name == shared
                un = await stub.NodeUnprepareResources(v1.NodeUnprepareResourcesRequest(claims=[
                    v1.Claim(namespace="default", name="whole", uid=whole["metadata"]["uid"]),
                    v1.Claim(namespace="default", name="never", uid="u-never")]))
                assert {k: v.error for k, v in un.claims.items()} == {whole["metadata"]["uid"]: "", "u-never": ""}
            assert await check_sockets(servers.dra_socket, servers.registration_socket) == ""
        finally:
            await servers.stop()
        assert not servers.dra_socket.exists() and not servers.registration_socket.exists()
        assert "UNAVAILABLE" in await check_sockets(servers.dra_socket, servers.registration_socket, timeout=0.5)

    asyncio.run(scenario())


@pytest.mark.slow
def test_plugin_process_serves_and_stops_cleanly_on_sigterm(tmp_path) -> None:
    profile = tmp_path / "gpus.yaml"
    profile.write_text("apiVersion: gpu.partita.dev/v1alpha1\nkind: FakeGpuProfile\n"
                       "nodes:\n- name: '*'\n  gpus:\n  - {model: L4, count: 1}\n")
    reg_dir, plugins = tmp_path / "registry", tmp_path / "plugins"
    # no API server: the publisher retries in the background; the kubelet-facing sockets still serve
    proc = subprocess.Popen([sys.executable, "-m", "driver", "plugin", "--node-name", NODE, "--nvml", "fake",
                             "--fake-profile", str(profile), "--cdi-root", str(tmp_path / "cdi"),
                             "--kubelet-registrar-directory-path", str(reg_dir),
                             "--kubelet-plugins-directory-path", str(plugins), "--kube-api", "http://127.0.0.1:9",
                             "--health-port", "-1", "--metrics-port", "-1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reg_sock = reg_dir / "gpu.partita.dev-reg.sock"
    dra_sock = plugins / "gpu.partita.dev" / "dra.sock"
    try:
        deadline = time.time() + 30
        while not reg_sock.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert reg_sock.exists(), proc.stdout.read() if proc.poll() is not None else "no registration socket"
        assert dra_sock.exists()
        assert asyncio.run(check_sockets(dra_sock, reg_sock)) == ""
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert not reg_sock.exists() and not dra_sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
