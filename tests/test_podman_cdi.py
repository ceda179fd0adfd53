"""A real container runtime consumes Partita's CDI specs.

The plugin prepares claims over its unix socket (as the kubelet calls it) and writes CDI specs to
/var/run/cdi; podman runs busybox with the returned CDI device IDs and the container sees the GPU's
environment. Needs root, podman, runc and /bin/busybox (``hack/test.sh`` installs them and sets
PARTITA_REQUIRE_PODMAN=1, which turns a missing piece into a failure instead of a skip).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest

from driver.api import naming
from driver.inventory import discover
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.prepare import DeviceState
from driver.plugin.server import DraService, PluginServers
from tests.support.claims import FakeClaims, allocated_claim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NODE = "node-a"
IMAGE = "localhost/partita-busybox-test:latest"
CDI_ROOT = Path("/var/run/cdi")
# --network=none: the container needs no network, and podman 5 (Debian trixie) would otherwise need nftables
# for its default network, which a minimal machine lacks.
PODMAN = ["podman", "--cgroup-manager=cgroupfs", "run", "--rm", "--runtime", "runc", "--network=none",
          "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def _missing() -> str:
    if os.geteuid() != 0:
        return "not root (podman with CDI specs in /var/run/cdi needs root)"
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/bin/busybox").exists():
        return "/bin/busybox is not installed (Debian package busybox-static)"
    return ""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("PARTITA_REQUIRE_PODMAN") == "1":
            pytest.fail(f"the podman CDI test cannot run: {why}")
        pytest.skip(why)
    if subprocess.run(["podman", "image", "exists", IMAGE]).returncode != 0:
        root = tmp_path_factory.mktemp("rootfs")
        tar = root / "rootfs.tar"
        with tarfile.open(tar, "w") as t:
            t.add("/bin/busybox", arcname="bin/busybox")
            for name in ("sh", "env", "cat", "ls", "sort"):
                info = tarfile.TarInfo(f"bin/{name}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(info)
        subprocess.run(["podman", "import", "-q", str(tar), IMAGE], check=True, capture_output=True)
    return IMAGE


def _run(*devices: str) -> str:
    args = [x for d in devices for x in ("--device", d)]
    r = subprocess.run([*PODMAN, *args, IMAGE, "/bin/sh", "-c", "env | sort"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_podman_runs_containers_with_our_cdi_devices(image, tmp_path) -> None:
    async def scenario():
        backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:2", NODE), node_name=NODE,
                               state_dir=tmp_path / "nvml")
        backend.init()
        inv = discover(backend, NODE)
        state = DeviceState(driver_name="gpu.partita.dev", node_name=NODE, backend=backend, inventory=inv,
                            cdi_root=CDI_ROOT, plugin_dir=tmp_path / "plugins" / "gpu.partita.dev", cdi_search_dirs=[])
        claims = FakeClaims()
        servers = PluginServers(DraService(state, claims), driver_name="gpu.partita.dev",
                                dra_socket=tmp_path / "plugins" / "gpu.partita.dev" / "dra.sock",
                                registration_socket=tmp_path / "registry" / "gpu.partita.dev-reg.sock")
        g0, g1 = (naming.gpu_device_name(g.uuid) for g in inv.gpus)
        whole = allocated_claim("whole", [g0])
        mig = allocated_claim("mig", [f"{g1}-mig-3g40gb-4"], request="inference")
        all_claims = (whole, mig)
        for c in all_claims:
            claims.add(c)
        await servers.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{servers.dra_socket}") as ch:
                stub = v1_grpc.DRAPluginStub(ch)
                resp = await stub.NodePrepareResources(v1.NodePrepareResourcesRequest(claims=[
                    v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in all_claims]))
                ids = {}
                for c in all_claims:
                    r = resp.claims[c["metadata"]["uid"]]
                    assert r.error == ""
                    [dev] = r.devices
                    [ids[c["metadata"]["name"]]] = dev.cdi_device_ids
                loop = asyncio.get_running_loop()
                env = await loop.run_in_executor(None, _run, ids["whole"])
                assert f"NVIDIA_VISIBLE_DEVICES={inv.gpus[0].uuid}\n" in env
                assert "PARTITA_DEVICE_TYPE=gpu\n" in env and f"PARTITA_CLAIM_UID={whole['metadata']['uid']}\n" in env
                env = await loop.run_in_executor(None, _run, ids["mig"])
                [mig_uuid] = [ln.split("=", 1)[1] for ln in env.splitlines() if ln.startswith("NVIDIA_VISIBLE_DEVICES=")]
                h = backend.device_by_uuid(inv.gpus[1].uuid)
                assert mig_uuid.startswith("MIG-") and mig_uuid in {m.uuid for m in backend.mig_devices(h)}
                assert "PARTITA_DEVICE_TYPE=mig\n" in env and f"PARTITA_MIG_UUID={mig_uuid}\n" in env
                un = await stub.NodeUnprepareResources(v1.NodeUnprepareResourcesRequest(claims=[
                    v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in all_claims]))
                assert all(r.error == "" for r in un.claims.values())
            # the specs are gone: podman can no longer resolve the devices
            assert not [p for c in all_claims for p in CDI_ROOT.glob(f"*{c['metadata']['uid']}*")]
            r = subprocess.run([*PODMAN, "--device", ids["whole"], IMAGE, "true"], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode != 0 and "unresolvable CDI devices" in r.stderr
        finally:
            await servers.stop()
            for c in all_claims:
                for p in CDI_ROOT.glob(f"*{c['metadata']['uid']}*"):
                    p.unlink()

    asyncio.run(scenario())
