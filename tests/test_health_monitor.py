"""The health monitor (issue 13 item 2) and the health taints it drives (item 3), on the fake NVML with a
hand-driven clock: events and checks -> states -> taints, recovery after the quiet period, floods."""

from __future__ import annotations

import asyncio

import pytest

from driver.api import constants as C
from driver.api import naming
from driver.inventory import discover
from driver.nvml.events import EVENT_XID, HealthEvent
from driver.nvml.fake import FakeNvml
from driver.nvml.interface import Placement
from driver.nvml.profile import parse_profile
from driver.plugin import metrics
from driver.plugin.healthmetrics import DeviceHealthGauge
from driver.plugin.healthmon import (DEGRADED, FATAL, HEALTHY, LOST, HealthConfig, HealthMonitor, classify_event,
                                     health_taints, parse_effects)
from driver.publisher import dropped_features
from driver.slices import SliceFeatures, build_slices


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _setup(tmp_path, gpus=None, quiet=30.0):
    prof = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                          "nodes": [{"name": "n", "gpus": gpus or [{"model": "H100-SXM5-80GB", "count": 2}]}]})
    b = FakeNvml(prof, "n", tmp_path / "state")
    b.init()
    clock = Clock()
    inv = discover(b, "n")
    mon = HealthMonitor(b, inv, HealthConfig(quiet_seconds=quiet), clock=clock, wall=lambda: 1_800_000_000.0)
    return b, inv, mon, clock


def _taints(slices, name):
    for s in slices:
        for d in s["spec"].get("devices") or []:
            if d["name"] == name:
                return [t for t in d.get("taints") or [] if t["key"] == C.HEALTH_TAINT_KEY]
    raise AssertionError(f"device {name} not published")


def _names(inv, i):
    gpu = naming.gpu_device_name(inv.gpus[i].uuid)
    return gpu, naming.shared_device_name(gpu), naming.mig_device_name(gpu, "1g.10gb", 3)


def test_event_table() -> None:
    ev = lambda xid: HealthEvent("GPU-x", EVENT_XID, xid)    # noqa: E731
    assert classify_event(ev(79))[0] == LOST
    assert classify_event(ev(48))[0] == FATAL
    assert classify_event(ev(63))[0] == DEGRADED
    assert classify_event(ev(31))[0] is None                 # the application's page fault
    assert classify_event(ev(999)) == (DEGRADED, "XID 999 (not in Partita's table: treated as degraded)")
    assert classify_event(ev(31), frozenset())[0] == DEGRADED


def test_lost_gpu_taints_all_its_devices_noexecute_and_recovers_after_reset_and_quiet_period(tmp_path) -> None:
    b, inv, mon, clock = _setup(tmp_path)
    gpu, shared, mig = _names(inv, 0)
    b.inject({"kind": "fallen_off_bus", "gpu": 0})
    mon.record_event(HealthEvent(inv.gpus[0].uuid, EVENT_XID, 79))
    slices = build_slices(inv, health=health_taints(mon.view(), parse_effects("")))
    for name in (gpu, shared, mig):
        assert _taints(slices, name) == [{"key": C.HEALTH_TAINT_KEY, "value": "lost", "effect": "NoExecute",
                                          "timeAdded": "2027-01-15T08:00:00Z"}]
    other = naming.gpu_device_name(inv.gpus[1].uuid)
    assert _taints(slices, other) == []
    # the managed taint stays first; the health taint is added
    assert [t["key"] for t in next(d for s in slices for d in s["spec"].get("devices") or []
                                   if d["name"] == gpu)["taints"]] == [C.MANAGED_TAINT_KEY, C.HEALTH_TAINT_KEY]
    clock.t += 100
    mon.check_now()                        # still lost: still answers GPU_IS_LOST
    assert mon.view().gpu(inv.gpus[0].uuid).state == LOST
    b.inject({"kind": "reset", "gpu": 0})
    mon.check_now()
    assert mon.view().gpu(inv.gpus[0].uuid).state == LOST          # clean, but the quiet period runs
    clock.t += 29
    mon.tick()
    assert mon.view().gpu(inv.gpus[0].uuid).state == LOST
    clock.t += 2
    mon.tick()
    assert mon.view().gpu(inv.gpus[0].uuid).healthy
    assert _taints(build_slices(inv, health=health_taints(mon.view(), {})), gpu) == []


def test_xid_on_a_mig_instance_taints_that_mig_device_only(tmp_path) -> None:
    b, inv, mon, clock = _setup(tmp_path)
    b.set_mig_mode(0, True)
    m = b.create_mig_device(0, 19, Placement(3, 1))
    gpu, shared, mig = _names(inv, 0)
    mon.record_event(HealthEvent(inv.gpus[0].uuid, EVENT_XID, 94, m.gpu_instance_id, m.compute_instance_id))
    view = mon.view()
    assert view.migs[mig].state == DEGRADED and "GPU instance" in view.migs[mig].reason
    slices = build_slices(inv, health=health_taints(view, parse_effects("")))
    assert [t["effect"] for t in _taints(slices, mig)] == ["NoSchedule"]
    assert _taints(slices, gpu) == [] and _taints(slices, shared) == []
    assert _taints(slices, naming.mig_device_name(gpu, "1g.10gb", 4)) == []
    # a GPU-wide problem is worse and wins on the MIG device
    mon.record_event(HealthEvent(inv.gpus[0].uuid, EVENT_XID, 48))
    assert mon.view().device(inv.gpus[0].uuid, mig).state == FATAL


def test_pending_repair_is_degraded_while_the_check_reports_it(tmp_path) -> None:
    b, inv, mon, clock = _setup(tmp_path)
    b.inject({"kind": "remapped_rows_pending", "gpu": 1})
    mon.check_now()
    assert mon.view().gpu(inv.gpus[1].uuid).state == DEGRADED
    clock.t += 1000
    mon.check_now()
    assert mon.view().gpu(inv.gpus[1].uuid).state == DEGRADED       # pending until a reset
    b.inject({"kind": "recovery_action", "gpu": 1, "action": "gpu_reset"})
    mon.check_now()
    assert mon.view().gpu(inv.gpus[1].uuid).state == FATAL
    b.inject({"kind": "reset", "gpu": 1})
    mon.check_now()
    clock.t += 31
    mon.check_now()
    assert mon.view().gpu(inv.gpus[1].uuid).healthy


def test_a_flood_of_events_changes_state_once(tmp_path) -> None:
    b, inv, mon, clock = _setup(tmp_path)
    seen = []

    async def main():
        mon.attach(asyncio.get_running_loop())
        mon.subscribe(seen.append)
        for _ in range(5000):
            mon.record_event(HealthEvent(inv.gpus[0].uuid, EVENT_XID, 63))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    before = metrics.HEALTH_EVENTS.labels("n", "xid")._value.get()
    asyncio.run(main())
    assert len(seen) == 1 and seen[0].gpu(inv.gpus[0].uuid).state == DEGRADED
    assert metrics.HEALTH_EVENTS.labels("n", "xid")._value.get() - before == 5000


def test_configured_effects_and_the_fallback_without_device_taints(tmp_path) -> None:
    b, inv, mon, clock = _setup(tmp_path)
    gpu, shared, mig = _names(inv, 0)
    mon.record_event(HealthEvent(inv.gpus[0].uuid, EVENT_XID, 63))
    taints = health_taints(mon.view(), parse_effects("degraded=None"))
    assert [t["effect"] for t in _taints(build_slices(inv, health=taints), gpu)] == ["None"]
    with pytest.raises(ValueError, match="STATE=EFFECT"):
        parse_effects("degraded=Evict")
    # the API server drops device taints: devices whose taint keeps allocations away are left out
    taints = health_taints(mon.view(), parse_effects(""))
    features = SliceFeatures(taints=False, health_taints=False)
    names = {d["name"] for s in build_slices(inv, features=features, health=taints) for d in s["spec"].get("devices") or []}
    assert gpu not in names and shared not in names and naming.gpu_device_name(inv.gpus[1].uuid) in names
    sent = build_slices(inv, features=SliceFeatures(taints=False), health=taints)[1]
    stored = {**sent, "spec": {**sent["spec"], "devices": [{k: v for k, v in d.items() if k != "taints"}
                                                           for d in sent["spec"]["devices"]]}}
    assert dropped_features(sent, stored)["health_taints"]


def test_device_health_metric_keeps_one_series_per_device(tmp_path) -> None:
    b, inv, mon, clock = _setup(tmp_path)
    gauge = DeviceHealthGauge("n-metric", inv)
    gpu, shared, mig = _names(inv, 0)
    gauge.update(mon.view())

    def states(name):
        return sorted(s.labels["state"] for m in metrics.DEVICE_HEALTH.collect() for s in m.samples
                      if s.labels["node"] == "n-metric" and s.labels["device"] == name)

    assert states(gpu) == [HEALTHY] and states(mig) == [HEALTHY]
    mon.record_event(HealthEvent(inv.gpus[0].uuid, EVENT_XID, 79))
    gauge.update(mon.view())
    assert states(gpu) == [LOST] and states(shared) == [LOST] and states(mig) == [LOST]
    assert states(naming.gpu_device_name(inv.gpus[1].uuid)) == [HEALTHY]


def test_claims_healthy_condition_follows_the_monitor_and_only_changes_are_written(tmp_path) -> None:
    """Issue 13 item 4: the Healthy condition in claims' status.devices turns False with the state when the
    GPU fails, and True again when it recovers (driver/plugin/healthsetup.py HealthConditions)."""
    from driver.plugin.healthsetup import HealthConditions

    class Writer:
        def __init__(self):
            self.calls = []

        def set_device_health(self, target, healthy, reason="", message=""):
            self.calls.append((target, healthy, reason))
            return 1

    b, inv, mon, clock = _setup(tmp_path, quiet=30.0)
    w = Writer()
    cond = HealthConditions(w)         # a listener of the monitor; called here by hand (no event loop)
    uuid = inv.gpus[0].uuid
    b.inject({"kind": "fallen_off_bus", "gpu": 0})
    mon.record_event(HealthEvent(uuid, EVENT_XID, 79))
    cond.update(mon.view())
    assert w.calls == [(uuid, False, "DeviceLost")]
    cond.update(mon.view())                         # the same view again: nothing written
    assert w.calls == [(uuid, False, "DeviceLost")]
    b.inject({"kind": "reset", "gpu": 0})
    mon.check_now()
    clock.t += 31
    mon.tick()
    assert mon.view().gpu(uuid).healthy
    cond.update(mon.view())
    assert w.calls[-1] == (uuid, True, "")
    assert [c for c in w.calls if c[0] != uuid] == []     # the other GPU was never touched
