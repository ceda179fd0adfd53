"""The NVML usage calls: the fake answers like hardware (refusals on MIG included), the real backend maps pynvml."""

from __future__ import annotations

import json
import types

import pynvml

import pytest

from driver.nvml import errors, open_backend, profile_from_spec
from driver.nvml.fake import USAGE_FILE
from driver.nvml.interface import Placement
from driver.nvml.real import RealNvml

GIB = 1024 ** 3


def _fake(spec="H100-SXM5-80GB:1", state_dir=None):
    b = open_backend("fake", profile=profile_from_spec(spec, "n"), node_name="n", state_dir=state_dir)
    b.init()
    return b


def test_whole_gpu_utilization_memory_and_processes_follow_the_injected_load(tmp_path) -> None:
    b = _fake(state_dir=tmp_path)
    h = b.device_by_index(0)
    uuid = b.device_info(h).uuid
    assert b.utilization_rates(h).gpu == 0 and b.memory_info(h).used == 0 and b.process_utilization(h) == []
    b.set_process_load(uuid, 4242, sm_util=70, memory_used_bytes=8 * GIB)
    b.set_process_load(uuid, 4343, sm_util=50, memory_used_bytes=2 * GIB, mem_util=10)
    u = b.utilization_rates(h)
    assert (u.gpu, u.memory) == (100, 45)                       # sum, capped; memUtil default smUtil/2
    m = b.memory_info(h)
    assert (m.used, m.free, m.total) == (10 * GIB, m.total - 10 * GIB, b.device_info(h).memory_total_bytes)
    assert [(p.pid, p.used_gpu_memory, p.gpu_instance_id) for p in b.compute_processes(h)] == \
        [(4242, 8 * GIB, None), (4343, 2 * GIB, None)]
    assert [(p.pid, p.sm_util) for p in b.process_utilization(h)] == [(4242, 70), (4343, 50)]
    # another backend on the same state directory (the sandbox injecting load) is seen at once
    other = _fake(state_dir=tmp_path)
    other.clear_process_load(4242)
    assert b.utilization_rates(h).gpu == 50
    with pytest.raises(errors.InsufficientResourcesError, match="do not fit"):
        b.set_process_load(uuid, 1, sm_util=1, memory_used_bytes=200 * GIB)
    with pytest.raises(errors.InvalidArgumentError, match="smUtil must be an integer from 0 to 100"):
        b.set_process_load(uuid, 1, sm_util=101)


def test_mig_refuses_utilization_like_nvml_and_reports_instances_through_gpm() -> None:
    b = _fake()
    h = b.device_by_index(0)
    b.set_mig_mode(h, True)
    mig = b.create_mig_device(h, 19, Placement(0, 1))          # 1g.10gb
    with pytest.raises(errors.NotSupportedError, match="MIG mode"):
        b.utilization_rates(h)
    with pytest.raises(errors.NotSupportedError, match="MIG mode"):
        b.process_utilization(h)
    mh = b.mig_device_handle(mig.uuid)
    with pytest.raises(errors.NotSupportedError, match="MIG device"):
        b.utilization_rates(mh)
    with pytest.raises(errors.NotSupportedError, match="MIG device"):
        b.process_utilization(mh)
    b.set_process_load(mig.uuid, 77, sm_util=30, memory_used_bytes=GIB)
    assert b.memory_info(mh).used == GIB and b.memory_info(mh).total == mig.memory_mib * 1024 * 1024
    assert b.memory_info(h).used == GIB                          # the GPU's memory includes its instances'
    assert [(p.pid, p.gpu_instance_id, p.compute_instance_id) for p in b.compute_processes(mh)] == \
        [(77, mig.gpu_instance_id, mig.compute_instance_id)]
    assert b.mig_utilization(h, mig.gpu_instance_id) is None     # GPM: one sample is no rate yet
    assert b.mig_utilization(h, mig.gpu_instance_id) == 30.0
    with pytest.raises(errors.NotFoundError):
        b.mig_utilization(h, 99)
    with pytest.raises(errors.InsufficientResourcesError):      # more than the instance's 10 GB
        b.set_process_load(mig.uuid, 78, sm_util=1, memory_used_bytes=20 * GIB)
    b.destroy_mig_device(h, mig.gpu_instance_id)
    with pytest.raises(errors.NotFoundError):
        b.memory_info(mh)                                        # the instance is gone
    assert b.memory_info(h).used == 0                            # its process is not reported


def test_gpm_is_not_supported_on_ampere() -> None:
    b = _fake("A100-SXM4-40GB:1")
    h = b.device_by_index(0)
    with pytest.raises(errors.NotSupportedError, match="Performance Monitoring"):
        b.mig_utilization(h, 1)


def test_a_bad_usage_file_is_named_with_the_field(tmp_path) -> None:
    b = _fake(state_dir=tmp_path)
    h = b.device_by_index(0)
    (tmp_path / USAGE_FILE).write_text(json.dumps({"processes": {"12": {"device": "x", "smUtil": "high"}}}))
    with pytest.raises(errors.NvmlError, match=r"usage.json: processes\['12'\]: smUtil must be an integer"):
        b.utilization_rates(h)
    (tmp_path / USAGE_FILE).write_text("{")
    with pytest.raises(errors.NvmlError, match="unreadable"):
        b.memory_info(h)


def _pynvml(**calls):
    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value
    n = types.SimpleNamespace(NVMLError=NVMLError, nvmlDeviceGetUUID=lambda h: b"GPU-1", **calls)
    return n


def test_real_backend_maps_pynvml_usage_calls() -> None:
    na = 0xFFFFFFFF
    procs = [types.SimpleNamespace(pid=10, usedGpuMemory=5, gpuInstanceId=na, computeInstanceId=na),
             types.SimpleNamespace(pid=11, usedGpuMemory=None, gpuInstanceId=3, computeInstanceId=0)]
    samples = [types.SimpleNamespace(pid=10, timeStamp=5, smUtil=20, memUtil=1),
               types.SimpleNamespace(pid=10, timeStamp=9, smUtil=40, memUtil=2),
               types.SimpleNamespace(pid=11, timeStamp=7, smUtil=5, memUtil=0)]
    n = _pynvml(nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=37, memory=12),
                nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=100, used=40, free=60),
                nvmlDeviceGetComputeRunningProcesses=lambda h: procs,
                nvmlDeviceGetProcessUtilization=lambda h, ts: samples)
    b = RealNvml(n)
    assert b.utilization_rates("h").gpu == 37 and b.memory_info("h").free == 60
    assert [(p.pid, p.used_gpu_memory, p.gpu_instance_id) for p in b.compute_processes("h")] == \
        [(10, 5, None), (11, None, 3)]
    assert [(p.pid, p.sm_util) for p in b.process_utilization("h")] == [(10, 40), (11, 5)]   # newest sample

    def refuse(code):
        def f(*a):
            raise n.NVMLError(code)
        return f
    n.nvmlDeviceGetProcessUtilization = refuse(errors.NOT_FOUND)
    assert b.process_utilization("h") == []
    n.nvmlDeviceGetProcessUtilization = refuse(0)              # pynvml with no sample at all
    assert b.process_utilization("h") == []
    n.nvmlDeviceGetUtilizationRates = refuse(errors.NOT_SUPPORTED)
    with pytest.raises(errors.NotSupportedError, match="nvmlDeviceGetUtilizationRates"):
        b.utilization_rates("mig-handle")
    n.nvmlGpmQueryDeviceSupport = lambda h: types.SimpleNamespace(isSupportedDevice=0)
    with pytest.raises(errors.NotSupportedError, match="Performance Monitoring"):
        b.mig_utilization("h", 1)


def test_the_profile_gives_gpus_a_background_load() -> None:
    from driver.nvml.profile import ProfileError, parse_profile
    from driver.nvml.fake import PROFILE_LOAD_PID

    prof = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [{"name": "n", "gpus": [
        {"model": "L4", "count": 2, "load": {"smUtil": 30, "memoryUsedMiB": 1024}}, {"model": "T4"}]}]}
    b = open_backend("fake", profile=parse_profile(prof), node_name="n")
    b.init()
    for slot in (0, 1):
        h = b.device_by_index(slot)
        assert b.utilization_rates(h).gpu == 30 and b.memory_info(h).used == 1024 * 1024 * 1024
        assert [p.pid for p in b.compute_processes(h)] == [PROFILE_LOAD_PID + slot]
    assert b.utilization_rates(b.device_by_index(2)).gpu == 0
    b.set_process_load(b.device_info(b.device_by_index(0)).uuid, PROFILE_LOAD_PID, sm_util=0)   # stop it
    assert b.utilization_rates(b.device_by_index(0)).gpu == 0
    prof["nodes"][0]["gpus"][0]["load"] = {"smUtil": 30, "memoryUsedMiB": 999999}
    with pytest.raises(ProfileError, match="load.memoryUsedMiB 999999 is more than a L4 has"):
        parse_profile(prof)
    prof["nodes"][0]["gpus"][0]["load"] = {"smUtil": 130}
    with pytest.raises(ProfileError, match="smUtil"):
        parse_profile(prof)


def test_real_backend_mig_utilization_takes_two_gpm_samples_and_frees_them() -> None:
    freed, taken = [], []

    def alloc():
        s = pynvml.c_nvmlGpmSample_t()
        taken.append(s)
        return s

    def metrics_get(get):
        assert get.numMetrics == 1 and get.metrics[0].metricId == pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL
        get.metrics[0].nvmlReturn = 0
        get.metrics[0].value = 42.5
        return get

    n = _pynvml(nvmlGpmQueryDeviceSupport=lambda h: types.SimpleNamespace(isSupportedDevice=1),
                nvmlGpmSampleAlloc=alloc, nvmlGpmSampleFree=freed.append,
                nvmlGpmMigSampleGet=lambda h, gi, s: s, nvmlGpmMetricsGet=metrics_get,
                c_nvmlGpmMetricsGet_t=pynvml.c_nvmlGpmMetricsGet_t,
                NVML_GPM_METRICS_GET_VERSION=pynvml.NVML_GPM_METRICS_GET_VERSION,
                NVML_GPM_METRIC_GRAPHICS_UTIL=pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL)
    b = RealNvml(n)
    assert b.mig_utilization("h", 3) is None          # one sample: no rate yet
    assert b.mig_utilization("h", 3) == 42.5
    assert freed == [taken[0]]                          # the older sample is freed, the newer kept for next time
    assert b.mig_utilization("h", 5) is None            # per GPU instance
