"""The real backend's logic, exercised without a GPU (nvidia-ml-py's module replaced by a stand-in)."""

from __future__ import annotations

import ctypes
import types

import pynvml
import pytest

from driver.nvml import errors
from driver.nvml.interface import Placement
from driver.nvml.real import RealNvml, _normalize_bus_id


class _StandIn(types.SimpleNamespace):
    """The parts of pynvml RealNvml uses, answering like one H100 would."""


def _stand_in() -> types.SimpleNamespace:
    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    pci = types.SimpleNamespace(busId=b"00000000:1B:00.0", pciDeviceId=0x233010DE)
    n = _StandIn(
        NVMLError=NVMLError,
        c_nvmlGpuInstancePlacement_t=pynvml.c_nvmlGpuInstancePlacement_t,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "580.105.08", nvmlSystemGetCudaDriverVersion_v2=lambda: 13000,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: "h0",
        nvmlDeviceGetUUID=lambda h: b"GPU-11111111-2222-3333-4444-555555555555",
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3", nvmlDeviceGetBrand=lambda h: 14,
        nvmlDeviceGetArchitecture=lambda h: 9, nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=81559 * 2**20),
        nvmlDeviceGetPciInfo=lambda h: pci, nvmlDeviceGetNumaNodeId=lambda h: 1,
        nvmlDeviceGetMinorNumber=lambda h: 3,
        nvmlDeviceGetAttributes_v2=lambda h: types.SimpleNamespace(multiprocessorCount=0),
        nvmlDeviceSetMigMode=lambda h, mode: 0,
    )

    def placements(h, profile_id, arr, count_ref):
        starts = {9: [0, 4], 19: list(range(7))}[profile_id]
        for i, s in enumerate(starts):
            arr[i].start, arr[i].size = s, 4 if profile_id == 9 else 1
        ctypes.cast(count_ref, ctypes.POINTER(ctypes.c_uint)).contents.value = len(starts)

    n.nvmlDeviceGetGpuInstancePossiblePlacements = placements
    return n


def test_missing_library_on_this_machine_gives_an_actionable_error() -> None:
    backend = RealNvml()  # the real pynvml; no NVIDIA driver here
    with pytest.raises(errors.LibraryNotFoundError, match="--nvml fake --fake-profile"):
        backend.init()


def test_device_info_is_normalized() -> None:
    b = RealNvml(_stand_in())
    b.init()
    info = b.device_info(b.device_by_index(0))
    assert info.pci_bus_id == "0000:1b:00.0"
    assert info.brand == "NVIDIA" and info.architecture == "Hopper" and info.cuda_compute_capability == "9.0"
    assert info.pci_device_id == "0x233010DE" and info.numa_node == 1 and info.minor == 3
    # the driver did not report SMs for a whole GPU: the built-in model fills the gap
    assert info.multiprocessors == 132
    assert b.cuda_driver_version() == "13.0"


def test_errors_are_mapped_by_code() -> None:
    n = _stand_in()

    def in_use(h, mode):
        raise n.NVMLError(19)

    n.nvmlDeviceSetMigMode = in_use
    with pytest.raises(errors.InUseError, match="nvmlDeviceSetMigMode"):
        RealNvml(n).set_mig_mode("h0", True)


def test_pending_mig_mode_is_reported_as_not_active() -> None:
    n = _stand_in()
    n.nvmlDeviceSetMigMode = lambda h, mode: errors.RESET_REQUIRED
    assert RealNvml(n).set_mig_mode("h0", True) is False
    n.nvmlDeviceSetMigMode = lambda h, mode: 0
    assert RealNvml(n).set_mig_mode("h0", True) is True


def test_possible_placements_through_ctypes() -> None:
    b = RealNvml(_stand_in())
    assert b.gpu_instance_possible_placements("h0", 9) == [Placement(0, 4), Placement(4, 4)]
    assert len(b.gpu_instance_possible_placements("h0", 19)) == 7


def test_time_slice_uses_nvidia_smi_and_reports_failures(monkeypatch) -> None:
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return types.SimpleNamespace(returncode=1, stderr="Insufficient Permissions", stdout="")

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi")
    b = RealNvml(_stand_in(), run=run)
    with pytest.raises(errors.NvmlError, match="Insufficient Permissions"):
        b.set_time_slice("h0", "Long")
    assert calls[0][1:] == ["compute-policy", "-i", "GPU-11111111-2222-3333-4444-555555555555", "--set-timeslice=3"]


def test_bus_id_normalization() -> None:
    assert _normalize_bus_id("00000000:AB:00.0") == "0000:ab:00.0"
    assert _normalize_bus_id("0001:1B:00.0") == "0001:1b:00.0"
