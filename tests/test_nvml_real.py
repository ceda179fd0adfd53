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


# -- topology: fabric info and NVLink P2P (read-only, tolerant of NOT_SUPPORTED) -------------------------
def _with_fabric(n, *, state=3, status=0, clique=7, cluster=bytes(range(1, 17)), code=None, v_missing=False):
    def fill(h, ref):
        if code is not None:
            raise n.NVMLError(code)
        info = ctypes.cast(ref, ctypes.POINTER(pynvml.c_nvmlGpuFabricInfoV_t)).contents
        for i, b in enumerate(cluster):
            info.clusterUuid[i] = b
        info.cliqueId, info.state, info.status = clique, state, status
        return 0

    if not v_missing:
        n.nvmlDeviceGetGpuFabricInfoV = fill
        n.c_nvmlGpuFabricInfoV_t = pynvml.c_nvmlGpuFabricInfoV_t
    return n


def test_fabric_info_is_read_through_the_versioned_call() -> None:
    b = RealNvml(_with_fabric(_stand_in()))
    f = b.gpu_fabric_info("h0")
    assert f.cluster_uuid == "01020304-0506-0708-090a-0b0c0d0e0f10" and f.clique_id == 7
    assert f.state == 3 and f.status == 0


def test_fabric_info_not_supported_or_missing_from_the_binding_is_not_supported() -> None:
    with pytest.raises(errors.NotSupportedError):
        RealNvml(_with_fabric(_stand_in(), code=3)).gpu_fabric_info("h0")
    with pytest.raises(errors.NotSupportedError, match="not available"):
        RealNvml(_with_fabric(_stand_in(), v_missing=True)).gpu_fabric_info("h0")


def test_fabric_info_falls_back_to_the_original_call_on_an_older_driver() -> None:
    n = _with_fabric(_stand_in(), code=13)          # FUNCTION_NOT_FOUND for the _V call

    def original(h, ref):
        info = ctypes.cast(ref, ctypes.POINTER(pynvml.c_nvmlGpuFabricInfo_t)).contents
        info.cliqueId, info.state, info.status = 2, 3, 0
        return 0

    n.nvmlDeviceGetGpuFabricInfo, n.c_nvmlGpuFabricInfo_t = original, pynvml.c_nvmlGpuFabricInfo_t
    f = RealNvml(n).gpu_fabric_info("h0")
    assert f.clique_id == 2 and f.cluster_uuid == "00000000-0000-0000-0000-000000000000"


def _two_gpus(n, p2p):
    uuids = {"h0": b"GPU-11111111-2222-3333-4444-555555555555", "h1": b"GPU-66666666-2222-3333-4444-555555555555"}
    buses = {"h0": b"00000000:1B:00.0", "h1": b"00000000:43:00.0"}
    n.nvmlDeviceGetCount = lambda: 2
    n.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    n.nvmlDeviceGetUUID = lambda h: uuids[h]
    n.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=buses[h], pciDeviceId=0x233010DE)
    n.nvmlDeviceGetMigMode = lambda h: (0, 0)
    n.nvmlDeviceGetGpuInstanceProfileInfo = lambda h, p: (_ for _ in ()).throw(n.NVMLError(3))
    n.nvmlDeviceGetP2PStatus = p2p
    n.NVML_P2P_CAPS_INDEX_NVLINK = pynvml.NVML_P2P_CAPS_INDEX_NVLINK
    return n


def test_discovery_reads_fabric_clique_and_nvlink_peers_from_real_nvml(monkeypatch) -> None:
    from driver.inventory import discover

    asked = []

    def p2p(a, b, index):
        asked.append(index)
        return 0

    n = _two_gpus(_with_fabric(_stand_in()), p2p)
    b = RealNvml(n)
    monkeypatch.setattr(b, "is_healthy", lambda h: True)
    b.init()
    inv = discover(b, "node-a")
    assert asked == [pynvml.NVML_P2P_CAPS_INDEX_NVLINK]
    g0, g1 = inv.gpus
    assert g0.fabric_clique == g1.fabric_clique == "01020304-0506-0708-090a-0b0c0d0e0f10.7"
    assert g0.nvlink_peers == (g1.uuid,) and g1.nvlink_peers == (g0.uuid,)
    assert g0.nvlink_domain == g1.nvlink_domain == "0000:1b:00.0"


@pytest.mark.parametrize("fabric, p2p_answer", [
    ({"code": 3}, 5),                    # a PCIe board: fabric NOT_SUPPORTED, P2P status NOT_SUPPORTED
    ({"state": 2}, "raise"),             # registration still in progress; the P2P query itself refused
    ({"status": 19}, 5),                 # registration failed
    ({"cluster": bytes(16), "clique": 0}, 5),   # registered, but in no cluster
])
def test_discovery_without_fabric_or_nvlink_publishes_no_topology(monkeypatch, fabric, p2p_answer) -> None:
    from driver.inventory import discover

    n = _stand_in()

    def p2p(a, b, index):
        if p2p_answer == "raise":
            raise n.NVMLError(3)
        return p2p_answer

    n = _two_gpus(_with_fabric(n, **fabric), p2p)
    b = RealNvml(n)
    monkeypatch.setattr(b, "is_healthy", lambda h: True)
    b.init()
    inv = discover(b, "node-a")
    assert all(g.fabric_clique is None and g.nvlink_peers == () and g.nvlink_domain is None for g in inv.gpus)
