"""Usage sampling per claim (metrics with bounded series), process attribution of shares, idle claims."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from controller.sandbox.apiserver import ApiServer
from driver.api import naming
from driver.api.kube import Kube
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.nvml.interface import Placement
from driver.plugin.checkpoint import MigInstance, PreparedDevice
from driver.plugin.devicestatus import DeviceStatusWriter
from driver.plugin.idle import IdleDetector, PodEvents
from driver.plugin.observers import claim_view
from driver.plugin.usage import ProcessOwners, UsageSampler

NODE = "usage-node"
DRIVER = "gpu.partita.dev"
GIB = 1024 ** 3
USAGE_METRICS = ("partita_gpu_utilization_ratio", "partita_gpu_memory_used_bytes",
                 "partita_gpu_memory_allocated_bytes", "partita_gpu_device_info", "partita_claim_idle")


def _samples(name: str, **labels: str) -> list:
    out = []
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s)
    return out


def _value(name: str, **labels: str) -> float | None:
    found = _samples(name, **labels)
    assert len(found) <= 1, found
    return found[0].value if found else None


class Node:
    def __init__(self, spec="H100-SXM5-80GB:3"):
        self.b = open_backend("fake", profile=profile_from_spec(spec, NODE), node_name=NODE)
        self.b.init()
        self.inv = discover(self.b, NODE)

    def uuid(self, i: int) -> str:
        return self.inv.gpus[i].uuid

    def whole(self, i: int) -> PreparedDevice:
        return PreparedDevice(requestNames=["gpu"], pool=NODE, device=naming.gpu_device_name(self.uuid(i)),
                              cdiDeviceIDs=["x=y"], type="gpu", gpuUUID=self.uuid(i))

    def share(self, i: int, share_id: str, memory: str = "10Gi") -> PreparedDevice:
        return PreparedDevice(requestNames=["gpu"], pool=NODE, cdiDeviceIDs=["x=y"], type="shared",
                              device=naming.shared_device_name(naming.gpu_device_name(self.uuid(i))),
                              gpuUUID=self.uuid(i), shareID=share_id, consumedCapacity={"memory": memory})

    def mig(self, i: int):
        h = self.b.device_by_uuid(self.uuid(i))
        self.b.set_mig_mode(h, True)
        m = self.b.create_mig_device(h, 19, Placement(0, 1))
        dev = PreparedDevice(requestNames=["gpu"], pool=NODE, cdiDeviceIDs=["x=y"], type="mig", gpuUUID=self.uuid(i),
                             device=naming.mig_device_name(naming.gpu_device_name(self.uuid(i)), "1g.10gb", 0),
                             mig=MigInstance(gpuUUID=self.uuid(i), profileID=19, placementStart=0, placementSize=1,
                                             gpuInstanceID=m.gpu_instance_id, computeInstanceID=m.compute_instance_id,
                                             uuid=m.uuid))
        return dev, m


def _claim(name: str, uid: str, pod: str = "", pod_uid: str = "") -> dict:
    c = {"metadata": {"name": name, "namespace": "ml", "uid": uid, "generation": 1}, "status": {}}
    if pod:
        c["status"]["reservedFor"] = [{"resource": "pods", "name": pod, "uid": pod_uid or f"pod-{uid}"}]
    return c


def _view(node: Node, name: str, uid: str, devices, pod: str = "", pod_uid: str = ""):
    return claim_view(DRIVER, uid, "ml", name, _claim(name, uid, pod, pod_uid), devices, node.inv)


def test_whole_and_mig_claims_export_utilization_memory_and_the_device_info(tmp_path) -> None:
    n = Node()
    s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path))
    whole = _view(n, "train", "u-train", [n.whole(0)], pod="trainer-0")
    mig_dev, m = n.mig(1)
    mig = _view(n, "nb", "u-nb", [mig_dev], pod="notebook")
    s.prepared(whole)
    s.prepared(mig)
    n.b.set_process_load(n.uuid(0), 100, sm_util=85, memory_used_bytes=30 * GIB)
    n.b.set_process_load(m.uuid, 200, sm_util=12, memory_used_bytes=2 * GIB)
    first = s.sample()
    assert first["u-train"] == pytest.approx(0.85)
    assert first["u-nb"] is None                       # GPM needs two samples
    assert s.sample()["u-nb"] == pytest.approx(0.12)
    lw = dict(claim_name="train", pod_name="trainer-0", mode="whole", uuid=n.uuid(0), node=NODE)
    assert _value("partita_gpu_utilization_ratio", **lw) == pytest.approx(0.85)
    assert _value("partita_gpu_memory_used_bytes", **lw) == 30 * GIB
    assert _value("partita_gpu_memory_allocated_bytes", **lw) == n.inv.gpus[0].memory_bytes
    lm = dict(claim_name="nb", mode="mig", uuid=m.uuid)
    assert _value("partita_gpu_utilization_ratio", **lm) == pytest.approx(0.12)
    assert _value("partita_gpu_memory_used_bytes", **lm) == 2 * GIB
    assert _value("partita_gpu_memory_allocated_bytes", **lm) == m.memory_mib * 1024 * 1024
    [info] = _samples("partita_gpu_device_info", claim_name="nb")
    assert info.labels["gpu_uuid"] == n.uuid(1) and info.labels["mig_uuid"] == m.uuid
    assert info.labels["gpu_instance_id"] == str(m.gpu_instance_id) and info.labels["profile"] == "1g.10gb"
    assert info.labels["model"] == n.inv.gpus[1].product_name
    s.unprepared("u-train")
    s.unprepared("u-nb")
    for name in USAGE_METRICS:
        assert not _samples(name, node=NODE, claim_name="train") and not _samples(name, node=NODE, claim_name="nb")


def _proc(root, pid: int, env: dict | None = None, cgroup: str = "") -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    if env is not None:
        (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()) + b"\0")
    if cgroup:
        (d / "cgroup").write_text(cgroup)


def test_shares_get_their_own_processes_by_cdi_environment_or_pod_cgroup(tmp_path) -> None:
    n = Node()
    s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path))
    a = _view(n, "a", "u-a", [n.share(2, "aaaaaaaa-0000-0000-0000-000000000001", "20Gi")], pod="pa")
    b = _view(n, "b", "u-b", [n.share(2, "bbbbbbbb-0000-0000-0000-000000000002")], pod="pb",
              pod_uid="0d1c6b4a-2f1e-4d5c-9b8a-7f6e5d4c3b2a")
    s.prepared(a)
    s.prepared(b)
    _proc(tmp_path, 11, {"PATH": "/bin", "PARTITA_CLAIM_UID": "u-a",
                         "PARTITA_SHARE_ID": "aaaaaaaa-0000-0000-0000-000000000001"})
    _proc(tmp_path, 12, {}, "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
                            "pod0d1c6b4a_2f1e_4d5c_9b8a_7f6e5d4c3b2a.slice/cri-containerd-1.scope\n")
    _proc(tmp_path, 13, {"PARTITA_CLAIM_UID": "someone-else"})
    n.b.set_process_load(n.uuid(2), 11, sm_util=40, memory_used_bytes=5 * GIB)
    n.b.set_process_load(n.uuid(2), 12, sm_util=3, memory_used_bytes=GIB)
    n.b.set_process_load(n.uuid(2), 13, sm_util=50, memory_used_bytes=GIB)
    out = s.sample()
    assert out == {"u-a": pytest.approx(0.40), "u-b": pytest.approx(0.03)}
    assert _value("partita_gpu_memory_used_bytes", claim_name="a", node=NODE) == 5 * GIB
    assert _value("partita_gpu_memory_used_bytes", claim_name="b", node=NODE) == GIB
    assert _value("partita_gpu_memory_allocated_bytes", claim_name="a", node=NODE) == 20 * GIB
    assert _value("partita_gpu_utilization_ratio", claim_name="b", mode="shared", node=NODE) == pytest.approx(0.03)
    s.unprepared("u-a")
    s.unprepared("u-b")


def test_unattributable_processes_of_several_shares_give_no_utilization_but_one_share_gets_them_all(tmp_path) -> None:
    n = Node()
    s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path / "no-proc"))
    a = _view(n, "x", "u-x", [n.share(0, "aaaaaaaa-0000-0000-0000-000000000003")], pod="px")
    s.prepared(a)
    n.b.set_process_load(n.uuid(0), 21, sm_util=30, memory_used_bytes=GIB)
    assert s.sample() == {"u-x": pytest.approx(0.30)}           # the only share on the GPU
    b = _view(n, "y", "u-y", [n.share(0, "bbbbbbbb-0000-0000-0000-000000000004")], pod="py")
    s.prepared(b)
    assert s.sample() == {"u-x": None, "u-y": None}
    assert _value("partita_gpu_utilization_ratio", claim_name="x", node=NODE) is None
    s.unprepared("u-x")
    s.unprepared("u-y")


def test_series_are_bounded_by_the_prepared_claims(tmp_path) -> None:
    n = Node()
    s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path), idle=IdleDetector(NODE, threshold=0.05, period=60))
    for round_ in range(3):
        for i in range(40):
            s.prepared(_view(n, f"c{round_}-{i}", f"u{round_}-{i}", [n.share(i % 3, f"00000000-0000-0000-0000-{i:012d}")],
                             pod=f"p{i}"))
        s.sample()
        for name in ("partita_gpu_memory_allocated_bytes", "partita_gpu_device_info", "partita_claim_idle"):
            assert len(_samples(name, node=NODE)) == 40
        for i in range(40):
            s.unprepared(f"u{round_}-{i}")
        for name in USAGE_METRICS:
            assert _samples(name, node=NODE) == [], name


def test_a_claim_below_the_threshold_for_the_period_is_reported_idle_and_active_again(tmp_path) -> None:
    n = Node()
    now = [1000.0]
    idle = IdleDetector(NODE, threshold=0.05, period=600, clock=lambda: now[0])
    s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path), idle=idle)
    nb = _view(n, "notebook", "u-idle", [n.whole(0)], pod="jupyter-0")
    s.prepared(nb)
    labels = dict(node=NODE, claim_name="notebook", pod_name="jupyter-0", pod_namespace="ml")
    n.b.set_process_load(n.uuid(0), 300, sm_util=2, memory_used_bytes=GIB)
    for _ in range(5):                     # 4 minutes below the threshold
        s.sample()
        now[0] += 60
    assert _value("partita_claim_idle", **labels) == 0 and not idle.is_idle("u-idle")
    n.b.set_process_load(n.uuid(0), 300, sm_util=60)
    s.sample()                             # a burst restarts the period
    n.b.set_process_load(n.uuid(0), 300, sm_util=1)
    for _ in range(10):
        now[0] += 60
        s.sample()
    assert not idle.is_idle("u-idle")      # 9 minutes since the burst: not yet 10 below
    now[0] += 60
    s.sample()
    assert idle.is_idle("u-idle") and _value("partita_claim_idle", **labels) == 1
    n.b.set_process_load(n.uuid(0), 300, sm_util=5)       # at the threshold: active
    s.sample()
    assert not idle.is_idle("u-idle") and _value("partita_claim_idle", **labels) == 0
    s.unprepared("u-idle")
    assert _value("partita_claim_idle", **labels) is None


def test_unknown_utilization_never_makes_a_claim_idle() -> None:
    n = Node("A100-SXM4-40GB:1")
    h = n.b.device_by_uuid(n.uuid(0))
    assert n.b.mig_mode(h).current is False
    now = [0.0]
    idle = IdleDetector(NODE, threshold=0.05, period=10, clock=lambda: now[0])
    idle.prepared(_view(n, "m", "u-m", [n.whole(0)]))
    for _ in range(5):
        idle.observe("u-m", None)
        now[0] += 10
    assert not idle.is_idle("u-m")
    idle.unprepared("u-m")
    with pytest.raises(ValueError, match="--idle-threshold"):
        IdleDetector(NODE, threshold=0, period=10)


def test_idle_claims_get_the_idle_condition_and_an_event_on_their_pod(tmp_path) -> None:
    async def main():
        server = ApiServer()
        await server.start()
        kube = await Kube.connect(server.url)
        try:
            n = Node()
            claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                     "metadata": {"name": "nb", "namespace": "ml"},
                     "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}},
                     "status": {"allocation": {"devices": {"results": [
                         {"request": "gpu", "driver": DRIVER, "pool": NODE,
                          "device": naming.gpu_device_name(n.uuid(0))}]}},
                         "reservedFor": [{"resource": "pods", "name": "jupyter", "uid": "pod-uid-1"}]}}
            stored = server.create(claim)
            uid = stored["metadata"]["uid"]
            now = [0.0]
            writer = DeviceStatusWriter(kube, DRIVER, NODE)
            events = PodEvents(kube, NODE)
            idle = IdleDetector(NODE, threshold=0.1, period=30, writer=writer, events=events, clock=lambda: now[0])
            s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path), idle=idle)
            view = claim_view(DRIVER, uid, "ml", "nb", stored, [n.whole(0)], n.inv)
            writer.prepared(view)
            s.prepared(view)
            for _ in range(4):
                s.sample()
                now[0] += 15
            await writer.drain()
            await events.drain()
            [entry] = server.get("resourceclaims", "nb", "ml")["status"]["devices"]
            [cond] = [c for c in entry["conditions"] if c["type"] == "Idle"]
            assert cond["status"] == "True" and cond["reason"] == "BelowThreshold"
            assert "below 10%" in cond["message"] and "highest 0.0%" in cond["message"]
            [ev] = server.list("events", "ml")
            assert ev["reason"] == "GpuClaimIdle" and ev["involvedObject"]["name"] == "jupyter"
            assert ev["involvedObject"]["uid"] == "pod-uid-1" and ev["type"] == "Normal"
            n.b.set_process_load(n.uuid(0), 9, sm_util=50)
            s.sample()
            await writer.drain()
            await events.drain()
            [entry] = server.get("resourceclaims", "nb", "ml")["status"]["devices"]
            [cond] = [c for c in entry["conditions"] if c["type"] == "Idle"]
            assert cond["status"] == "False" and cond["reason"] == "AboveThreshold"
            assert sorted(e["reason"] for e in server.list("events", "ml")) == ["GpuClaimActive", "GpuClaimIdle"]
            s.unprepared(uid)
            writer.unprepared(uid)
            await writer.drain()
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_a_claim_prepared_again_for_another_pod_keeps_one_idle_series(tmp_path) -> None:
    n = Node()
    idle = IdleDetector(NODE, threshold=0.05, period=60)
    s = UsageSampler(n.b, NODE, owners=ProcessOwners(tmp_path), idle=idle)
    s.prepared(_view(n, "shared-claim", "u-again", [n.whole(0)], pod="first"))
    s.prepared(_view(n, "shared-claim", "u-again", [n.whole(0)], pod="second"))
    for name in ("partita_claim_idle", "partita_gpu_memory_allocated_bytes", "partita_gpu_device_info"):
        assert [x.labels["pod_name"] for x in _samples(name, claim_name="shared-claim")] == ["second"], name
    s.unprepared("u-again")
    assert not _samples("partita_claim_idle", claim_name="shared-claim")


def test_claims_prepared_before_a_restart_are_observed_again(tmp_path) -> None:
    from driver.plugin.observers import Observers
    from driver.plugin.prepare import DeviceState
    from driver.plugin.telemetry import restore_prepared
    from tests.support.claims import FakeClaims, allocated_claim

    n = Node()
    state = DeviceState(driver_name=DRIVER, node_name=NODE, backend=n.b, inventory=n.inv, cdi_root=tmp_path / "cdi",
                        plugin_dir=tmp_path / "plugin", cdi_search_dirs=[])
    claim = allocated_claim("kept", [naming.gpu_device_name(n.uuid(0))], node=NODE)
    claim["status"]["reservedFor"] = [{"resource": "pods", "name": "kept-pod", "uid": "pod-1"}]
    gone = allocated_claim("gone", [naming.gpu_device_name(n.uuid(1))], node=NODE)
    from driver.plugin.prepare import ClaimRef

    async def main():
        await state.prepare([(ClaimRef("default", "kept", claim["metadata"]["uid"]), claim),
                             (ClaimRef("default", "gone", gone["metadata"]["uid"]), gone)])
        seen = []

        class Recorder:
            def prepared(self, view):
                seen.append(view)

            def unprepared(self, uid):
                pass
        assert await restore_prepared(state, FakeClaims(claim), Observers([Recorder()])) == 1
        [view] = seen
        assert view.name == "kept" and view.pods == (("default", "kept-pod"),)
        assert view.devices[0].gpu_uuid == n.uuid(0) and view.devices[0].mode == "whole"
    asyncio.run(main())
