"""NVML health events and checks (issue 13 item 1): the fake behaves like hardware, the real backend maps
nvidia-ml-py's event set API."""

from __future__ import annotations

import ctypes
import json
import types

import pynvml
import pytest

from driver.inventory import discover
from driver.nvml import errors
from driver.nvml.events import (EVENT_ECC_DBE, EVENT_TYPE_DOUBLE_BIT_ECC, EVENT_TYPE_XID_CRITICAL, EVENT_XID,
                                HEALTH_EVENT_TYPES, NO_INSTANCE, RECOVERY_ACTION_GPU_RESET, HealthEvent)
from driver.nvml.fake import FakeNvml
from driver.nvml.interface import Placement
from driver.nvml.profile import InjectionError, ProfileError, parse_injection, parse_profile
from driver.nvml.real import RealNvml


def _profile(gpus=None, events=None):
    node = {"name": "n", "gpus": gpus or [{"model": "H100-SXM5-80GB", "count": 2}]}
    if events is not None:
        node["healthEvents"] = events
    return parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [node]})


def _fake(tmp_path, **kw) -> FakeNvml:
    b = FakeNvml(_profile(**kw), "n", tmp_path / "state")
    b.init()
    return b


def _listening(b: FakeNvml) -> int:
    es = b.event_set_create()
    for i in range(b.device_count()):
        b.register_events(es, i, HEALTH_EVENT_TYPES)
    return es


def test_xid_is_delivered_to_registered_event_sets_only(tmp_path) -> None:
    b = _fake(tmp_path)
    es = _listening(b)
    other = b.event_set_create()                      # registered for nothing
    b.inject({"kind": "xid", "gpu": 1, "xid": 63})
    assert b.event_set_wait(es, 0) == HealthEvent(b.device_info(1).uuid, EVENT_XID, 63)
    assert b.event_set_wait(es, 0) is None            # delivered once
    assert b.event_set_wait(other, 0) is None


def test_xid_on_a_mig_instance_carries_its_gpu_and_compute_instance_ids(tmp_path) -> None:
    b = _fake(tmp_path)
    b.set_mig_mode(0, True)
    mig = b.create_mig_device(0, 19, Placement(2, 1))
    es = _listening(b)
    b.inject({"kind": "xid", "mig": mig.uuid, "xid": 43})
    ev = b.event_set_wait(es, 0)
    assert (ev.gpu_instance_id, ev.compute_instance_id) == (mig.gpu_instance_id, mig.compute_instance_id)
    b.inject({"kind": "xid", "gpu": 0, "gpuInstance": mig.gpu_instance_id, "xid": 43})
    assert b.event_set_wait(es, 0).gpu_instance_id == mig.gpu_instance_id
    with pytest.raises(InjectionError, match="has no GPU instance 9"):
        b.inject({"kind": "xid", "gpu": 0, "gpuInstance": 9, "xid": 43})


def test_a_gpu_that_fell_off_the_bus_answers_gpu_is_lost_until_reset(tmp_path) -> None:
    b = _fake(tmp_path)
    es = _listening(b)
    b.inject({"kind": "fallen_off_bus", "gpu": 0})
    assert b.event_set_wait(es, 0).xid == 79
    for call in (b.mig_mode, b.running_processes, b.health_check, b.compute_mode):
        with pytest.raises(errors.GpuLostError):
            call(0)
    assert not b.is_healthy(0) and b.device_info(0).uuid        # still inventoried, as UNHEALTHY
    inv = discover(b, "n")
    assert [g.healthy for g in inv.gpus] == [False, True]
    with pytest.raises(InjectionError, match="fallen off the bus"):
        b.inject({"kind": "xid", "gpu": 0, "xid": 13})           # a lost GPU reports nothing
    b.inject({"kind": "reset", "gpu": 0})
    assert b.is_healthy(0) and b.health_check(0).recovery_action == 0


def test_reset_is_refused_while_processes_run(tmp_path) -> None:
    b = _fake(tmp_path)
    b.add_process(b.device_info(0).uuid, 4242)
    b.inject({"kind": "recovery_action", "gpu": 0, "action": "gpu_reset"})
    with pytest.raises(InjectionError, match="refused.*4242"):
        b.inject({"kind": "reset", "gpu": 0})
    assert b.health_check(0).recovery_action == RECOVERY_ACTION_GPU_RESET     # nothing changed
    b.remove_process(b.device_info(0).uuid, 4242)
    b.inject({"kind": "reset", "gpu": 0})
    assert b.health_check(0).recovery_action == 0


def test_dbe_leaves_a_repair_pending_until_reset(tmp_path) -> None:
    b = _fake(tmp_path, gpus=[{"model": "H100-SXM5-80GB"}, {"model": "T4"}])
    es = _listening(b)
    b.inject({"kind": "ecc_dbe", "gpu": 0})
    b.inject({"kind": "ecc_dbe", "gpu": 1})
    assert b.event_set_wait(es, 0).kind == EVENT_ECC_DBE
    assert b.health_check(0).remapped_rows_pending and not b.health_check(0).retired_pages_pending
    assert b.health_check(1).retired_pages_pending                # Turing retires pages
    b.inject({"kind": "reset", "gpu": 0})
    assert not b.health_check(0).remapped_rows_pending


def test_health_state_is_hardware_state_shared_through_the_state_directory(tmp_path) -> None:
    a = _fake(tmp_path)
    a.inject({"kind": "fallen_off_bus", "gpu": 1})
    b = _fake(tmp_path)                                  # a restarted plugin
    assert not b.is_healthy(1)


def test_events_file_is_followed_bad_lines_are_named_and_skipped(tmp_path, caplog) -> None:
    b = _fake(tmp_path)
    f = tmp_path / "events.jsonl"
    b.set_events_file(f)
    es = _listening(b)
    assert b.event_set_wait(es, 0) is None            # no file yet: nothing, no error
    f.write_text('{"kind": "nope", "gpu": 0}\n{"kind": "xid", "gpu": 5, "xid": 3}\nnot json\n'
                 '{"kind": "xid", "gpu": 1, "xid": 31}\n{"kind": "xid", "gpu": 0, "xid"')   # last: unfinished
    ev = b.event_set_wait(es, 200)
    assert ev is not None and ev.xid == 31 and ev.gpu_uuid == b.device_info(1).uuid
    assert [e.split(": ")[0].rsplit(" ", 2)[-2:] for e in b.injection_errors] == [["line", "1"], ["line", "2"],
                                                                                   ["line", "3"]]
    assert "unknown health event kind 'nope'" in b.injection_errors[0]
    assert "has no GPU 5" in b.injection_errors[1]
    with open(f, "a") as out:
        out.write(': 48}\n')                         # the unfinished line completed
    assert b.event_set_wait(es, 200).xid == 48
    # a restarted plugin goes on after what was read
    c = _fake(tmp_path)
    c.set_events_file(f)
    assert c.event_set_wait(_listening(c), 50) is None


def test_profile_health_events_are_injected_once_something_listens(tmp_path) -> None:
    b = _fake(tmp_path, events=[{"kind": "xid", "gpu": 1, "xid": 79}])
    assert b.is_healthy(1)
    es = _listening(b)
    assert b.event_set_wait(es, 0).xid == 79 and not b.is_healthy(1)
    with pytest.raises(ProfileError, match="unknown health event kind"):
        _profile(events=[{"kind": "meltdown", "gpu": 0}])


@pytest.mark.parametrize("line, error", [
    ('{"kind": "xid", "gpu": 0}', "without an xid number"),
    ('{"kind": "reset", "mig": "MIG-x"}', "condition of the whole GPU"),
    ('{"kind": "recovery_action", "gpu": 0, "action": "pray"}', "unknown recovery action 'pray'"),
    ('{"kind": "xid", "xid": 3}', "names no device"),
    ('{"kind": "xid", "gpu": 0, "xid": 3, "when": 1}', "when: unknown field"),
])
def test_injections_are_checked_with_named_errors(line, error) -> None:
    with pytest.raises(InjectionError, match=error):
        parse_injection(line, "x")


def test_an_event_flood_is_bounded_in_memory(tmp_path) -> None:
    b = _fake(tmp_path)
    es = _listening(b)
    f = tmp_path / "events.jsonl"
    f.write_text("".join(json.dumps({"kind": "xid", "gpu": 0, "xid": 31}) + "\n" for _ in range(12000)))
    b.set_events_file(f)
    assert b.event_set_wait(es, 0) is not None
    assert len(b._event_sets[es]["queue"]) < 10000


# -- the real backend, nvidia-ml-py replaced by a stand-in -----------------------------------------------
def _nvml(**over):
    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    uuids = {"h0": b"GPU-00000000-0000-0000-0000-000000000000", "h1": b"GPU-11111111-1111-1111-1111-111111111111"}
    registered = []
    n = types.SimpleNamespace(
        NVMLError=NVMLError, registered=registered,
        nvmlDeviceGetUUID=lambda h: uuids[h],
        nvmlEventSetCreate=lambda: "es", nvmlEventSetFree=lambda es: None,
        nvmlDeviceGetSupportedEventTypes=lambda h: EVENT_TYPE_XID_CRITICAL | 0x4,   # no DBE event on this GPU
        nvmlDeviceRegisterEvents=lambda h, types_, es: registered.append((h, types_, es)),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=1),
        nvmlDeviceGetRetiredPagesPendingStatus=lambda h: (_ for _ in ()).throw(NVMLError(3)),
        nvmlDeviceGetRemappedRows=lambda h: (0, 1, 1, 0),
    )

    def fields(h, ids):
        v = pynvml.c_nvmlFieldValue_t()
        v.fieldId, v.nvmlReturn = ids[0], 0
        v.value.uiVal = RECOVERY_ACTION_GPU_RESET
        return [v]

    n.nvmlDeviceGetFieldValues = fields
    for k, v in over.items():
        setattr(n, k, v)
    return n


def _event(etype, data, gi=NO_INSTANCE, ci=NO_INSTANCE):
    ev = pynvml.c_nvmlEventData_t()
    ev.device = ctypes.cast(0, pynvml.c_nvmlDevice_t)
    ev.eventType, ev.eventData, ev.gpuInstanceId, ev.computeInstanceId = etype, data, gi, ci
    return ev


def test_real_registers_only_supported_health_types() -> None:
    n = _nvml()
    b = RealNvml(n)
    b.register_events("es", "h0", HEALTH_EVENT_TYPES)
    assert n.registered == [("h0", EVENT_TYPE_XID_CRITICAL, "es")]
    n.nvmlDeviceGetSupportedEventTypes = lambda h: 0x4
    with pytest.raises(errors.NotSupportedError, match="none of the event types"):
        b.register_events("es", "h1", HEALTH_EVENT_TYPES)


def test_real_event_wait_maps_event_data() -> None:
    queue = [_event(EVENT_TYPE_XID_CRITICAL, 79), _event(EVENT_TYPE_DOUBLE_BIT_ECC, 0, 3, 0)]
    n = _nvml(nvmlDeviceGetUUID=lambda h: b"GPU-x")

    def wait(es, timeout):
        if not queue:
            raise n.NVMLError(errors.TIMEOUT)
        return queue.pop(0)

    n.nvmlEventSetWait_v2 = wait
    b = RealNvml(n)
    assert b.event_set_wait("es", 10) == HealthEvent("GPU-x", EVENT_XID, 79, None, None)
    assert b.event_set_wait("es", 10) == HealthEvent("GPU-x", EVENT_ECC_DBE, 0, 3, 0)
    assert b.event_set_wait("es", 10) is None                 # NVML_ERROR_TIMEOUT: no event


def test_real_health_check_reads_pending_repairs_and_recovery_action() -> None:
    b = RealNvml(_nvml())
    c = b.health_check("h0")
    assert c.remapped_rows_pending and not c.remapped_rows_failure and not c.retired_pages_pending
    assert c.recovery_action == RECOVERY_ACTION_GPU_RESET
    n = _nvml()
    n.nvmlDeviceGetMemoryInfo = lambda h: (_ for _ in ()).throw(n.NVMLError(errors.GPU_IS_LOST))
    with pytest.raises(errors.GpuLostError):
        RealNvml(n).health_check("h0")
