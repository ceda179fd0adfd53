"""The kubelet's health stream (issue 13 item 5) and the controller's pod events (item 6), unit level: which
devices are reported and how, and which pods hear about a failed device."""

from __future__ import annotations

import asyncio

from controller.operator.healthevents import REASON_RECOVERED, REASON_UNHEALTHY, HealthReporter
from driver.api import constants as C
from driver.kubeletapi.drahealth.v1 import api_pb2 as pb
from driver.plugin.checkpoint import CheckpointError, MigInstance, PreparedClaim, PreparedDevice
from driver.plugin.drahealth import ResourceHealth
from driver.plugin.healthmon import DeviceHealth, HealthView


def _dev(device: str, gpu: str, mig: bool = False) -> PreparedDevice:
    return PreparedDevice(requestNames=["gpu"], pool="node-a", device=device, cdiDeviceIDs=[f"k8s.x/gpu={device}"],
                          type="mig" if mig else "gpu", gpuUUID=gpu,
                          mig=MigInstance(gpuUUID=gpu, profileID=19, placementStart=0, placementSize=1) if mig else None)


class _State:
    def __init__(self, claims):
        self.claims = claims

    def prepared_claims(self):
        if isinstance(self.claims, Exception):
            raise self.claims
        return self.claims


def test_snapshot_reports_each_prepared_device_once_with_its_gpu_or_mig_health() -> None:
    claims = {
        "u1": PreparedClaim(uid="u1", namespace="d", name="a", state="Prepared",
                            devices=[_dev("gpu-a", "GPU-A"), _dev("gpu-b-mig-1g10gb-0", "GPU-B", mig=True)]),
        "u2": PreparedClaim(uid="u2", namespace="d", name="b", state="Prepared", devices=[_dev("gpu-a", "GPU-A")]),
        "u3": PreparedClaim(uid="u3", namespace="d", name="c", state="Preparing", devices=[_dev("gpu-c", "GPU-C")]),
    }
    view = HealthView(gpus={"GPU-A": DeviceHealth("lost", "GPU does not answer", 1.0)},
                      migs={"gpu-b-mig-1g10gb-0": DeviceHealth("degraded", "XID 94", 1.0)})
    svc = ResourceHealth(_State(claims), lambda: view, clock=lambda: 1234.0)
    resp = svc.snapshot()
    got = [(d.device.device_name, d.health, d.message, d.last_updated_time) for d in resp.devices]
    assert got == [("gpu-a", pb.UNHEALTHY, "lost: GPU does not answer", 1234),
                   ("gpu-b-mig-1g10gb-0", pb.UNHEALTHY, "degraded: XID 94", 1234)]
    assert all(d.device.pool_name == "node-a" and d.health_check_timeout_seconds == 30 for d in resp.devices)
    assert ResourceHealth(_State(CheckpointError("unreadable")), lambda: view).snapshot() is None


def test_the_stream_sends_on_change_and_keeps_alive_but_not_duplicates() -> None:
    claims = {"u1": PreparedClaim(uid="u1", namespace="d", name="a", state="Prepared", devices=[_dev("gpu-a", "GPU-A")])}
    views = [HealthView()]
    now = [100.0]
    svc = ResourceHealth(_State(claims), lambda: views[-1], resend_seconds=0.3, clock=lambda: now[0])

    async def main():
        it = svc.NodeWatchResources(pb.NodeWatchResourcesRequest(), None)
        first = await it.__anext__()
        assert first.devices[0].health == pb.HEALTHY and svc.streams == 1
        svc.notify()                                  # nothing changed: no message until the keep-alive
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        views.append(HealthView(gpus={"GPU-A": DeviceHealth("fatal", "double-bit ECC error", 1.0)}))
        svc.notify()
        second = await asyncio.wait_for(it.__anext__(), 2)
        assert second.devices[0].health == pb.UNHEALTHY and loop.time() - t0 < 0.2
        now[0] += 5
        third = await asyncio.wait_for(it.__anext__(), 2)      # keep-alive, same content, new time
        assert third.devices[0].health == pb.UNHEALTHY and third.devices[0].last_updated_time == 105
        assert loop.time() - t0 >= 0.25
        await it.aclose()
        assert svc.streams == 0

    asyncio.run(main())


class _Events:
    def __init__(self):
        self.posted = []

    async def post(self, obj, etype, reason, message):
        self.posted.append((obj["metadata"]["name"], etype, reason, message))


class _Cache:
    def __init__(self, claims, pods, users):
        self.claims, self.pods, self.claim_users = claims, pods, users


def _slice(taints: dict[str, dict]) -> dict:
    return {"metadata": {"name": "s0"}, "spec": {"driver": C.DEFAULT_DRIVER_NAME, "pool": {"name": "node-a"},
                                                 "devices": [{"name": n, "taints": [C.managed_taint()] + ([t] if t else [])}
                                                             for n, t in taints.items()]}}


def _claim(name: str, device: str, tolerations=None) -> dict:
    r = {"request": "gpu", "driver": C.DEFAULT_DRIVER_NAME, "pool": "node-a", "device": device}
    if tolerations:
        r["tolerations"] = tolerations
    return {"metadata": {"name": name, "namespace": "d"}, "status": {"allocation": {"devices": {"results": [r]}}}}


def test_pods_on_a_tainted_device_get_one_event_per_state_and_one_when_it_recovers() -> None:
    lost = C.health_taint("lost", "NoExecute", "2026-12-07T15:00:00Z")
    claims = {"d/a": _claim("a", "gpu-0"), "d/b": _claim("b", "gpu-1"),
              "d/t": _claim("t", "gpu-0", [{"key": C.HEALTH_TAINT_KEY, "operator": "Exists"}])}
    pods = {"d/p": {"metadata": {"name": "p"}, "status": {"phase": "Running"}},
            "d/q": {"metadata": {"name": "q"}, "status": {"phase": "Running"}},
            "d/done": {"metadata": {"name": "done"}, "status": {"phase": "Succeeded"}},
            "d/tol": {"metadata": {"name": "tol"}, "status": {"phase": "Running"}}}
    cache = _Cache(claims, pods, {"d/a": {"d/p", "d/done"}, "d/b": {"d/q"}, "d/t": {"d/tol"}})
    rep, events = HealthReporter(C.DEFAULT_DRIVER_NAME), _Events()

    async def main():
        assert rep.on_slice("ADDED", _slice({"gpu-0": lost, "gpu-1": None}))
        await rep.report(cache, events)
        assert not rep.on_slice("MODIFIED", _slice({"gpu-0": lost, "gpu-1": None}))   # no change: nothing queued
        await rep.report(cache, events)                                                 # and nothing posted twice
        assert rep.on_slice("MODIFIED", _slice({"gpu-0": None, "gpu-1": None}))
        await rep.report(cache, events)

    asyncio.run(main())
    by_pod = {(p, r): m for p, _, r, m in events.posted}
    assert sorted(by_pod) == [("p", REASON_RECOVERED), ("p", REASON_UNHEALTHY), ("tol", REASON_RECOVERED),
                              ("tol", REASON_UNHEALTHY)]
    assert "device taint eviction" in by_pod[("p", REASON_UNHEALTHY)]
    assert "tolerates it" in by_pod[("tol", REASON_UNHEALTHY)]
