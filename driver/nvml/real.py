"""Real NVML on nvidia-ml-py (module ``pynvml``).

Every call goes through :meth:`RealNvml._call`, which maps ``pynvml.NVMLError`` to our error classes
by return code. The ``pynvml`` module is injectable so the logic can be tested without a GPU.

Read-only except the explicit MIG, compute-mode and time-slice calls. NVML has no public call for the
compute time-slice; like NVIDIA's DRA driver (cmd/gpu-kubelet-plugin/nvlib.go ``setTimeSlice``) we run
``nvidia-smi compute-policy -i <uuid> --set-timeslice=<0..3>``.

NVML is ``libnvidia-ml.so.1``, which pynvml opens by that name (the container's library path: the NVIDIA
container runtime puts it there). With a *driver root* (``--nvidia-driver-root``, env NVIDIA_DRIVER_ROOT:
where a driver installed outside the host's ``/`` is mounted, e.g. the GPU Operator's driver container
under /run/nvidia/driver), the library is loaded from that root first, by its path; pynvml's later open
by name then finds the library already loaded (the dynamic loader matches its soname).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import uuid as uuidlib
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from . import errors
from .interface import (
    COMPUTE_MODE_DEFAULT,
    COMPUTE_MODE_EXCLUSIVE_PROCESS,
    COMPUTE_MODE_PROHIBITED,
    P2P_STATUS_NOT_SUPPORTED,
    TIME_SLICE_INTERVALS,
    ComputeInstanceInfo,
    ComputeInstanceProfileInfo,
    DeviceInfo,
    GpuFabricInfo,
    GpuInstanceInfo,
    GpuInstanceProfileInfo,
    MigDeviceInfo,
    MigMode,
    NvmlBackend,
    Placement,
)
from .events import (
    EVENT_ECC_DBE,
    EVENT_TYPE_DOUBLE_BIT_ECC,
    EVENT_TYPE_XID_CRITICAL,
    EVENT_XID,
    FIELD_GPU_RECOVERY_ACTION,
    NO_INSTANCE,
    RECOVERY_ACTION_NONE,
    HealthCheck,
    HealthEvent,
)
from .interface import MemoryInfo, ProcessInfo, ProcessUtilization, Utilization
from .models import model_for_product_name

_ARCH = {2: "Kepler", 3: "Maxwell", 4: "Pascal", 5: "Volta", 6: "Turing", 7: "Ampere", 8: "Ada Lovelace",
         9: "Hopper", 10: "Blackwell"}
_BRAND = {0: "Unknown", 1: "Quadro", 2: "Tesla", 3: "NVS", 4: "Grid", 5: "GeForce", 6: "Titan",
          7: "NVIDIA Virtual Applications", 8: "NVIDIA Virtual PC", 9: "NVIDIA Virtual Compute Server",
          10: "NVIDIA RTX Virtual Workstation", 11: "NVIDIA Cloud Gaming", 12: "Quadro RTX", 13: "NVIDIA RTX",
          14: "NVIDIA", 15: "GeForce RTX", 16: "Titan RTX"}
_COMPUTE_MODE = {0: COMPUTE_MODE_DEFAULT, 2: COMPUTE_MODE_PROHIBITED, 3: COMPUTE_MODE_EXCLUSIVE_PROCESS}
_MIG_PROFILE_NAME_SUFFIX = {7: "+me", 8: "+me"}


#: where drivers install libnvidia-ml.so.1, relative to the driver root (RHEL/SUSE, Debian/Ubuntu multiarch,
#: plain lib directories)
NVML_LIBRARY_DIRS = ("usr/lib64", "usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "lib64",
                     "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib", "lib")
NVML_LIBRARY = "libnvidia-ml.so.1"


def _inside(root: Path, path: Path) -> Path:
    """``path`` (a link inside ``root``) with its symbolic links resolved relative to ``root``: an absolute
    link target in a mounted driver root names a file of that root, not of this container."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise errors.LibraryNotFoundError(f"{path}: too many levels of symbolic links under driver root {root}")


def find_nvml_library(driver_root: str | os.PathLike) -> Path:
    """The path of libnvidia-ml.so.1 under ``driver_root``; LibraryNotFoundError naming the places tried."""
    root = Path(driver_root)
    if not root.is_dir():
        raise errors.LibraryNotFoundError(
            f"NVIDIA driver root {root} is not a directory: mount the driver's root there (the chart's "
            "plugin.driverRoot: / for a host install, /run/nvidia/driver for the GPU Operator's driver container)")
    for d in NVML_LIBRARY_DIRS:
        candidate = root / d / NVML_LIBRARY
        if candidate.is_symlink() or candidate.exists():
            resolved = _inside(root, candidate)
            if resolved.is_file():
                return resolved
    raise errors.LibraryNotFoundError(
        f"{NVML_LIBRARY} is not under NVIDIA driver root {root} (looked in {', '.join(NVML_LIBRARY_DIRS)}): "
        "is the driver installed there? Set the chart's plugin.driverRoot to the directory the driver is "
        "installed under (/ for a host install, /run/nvidia/driver for the GPU Operator's driver container)")


def _load_library(path: str) -> Any:
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RealNvml(NvmlBackend):
    kind = "real"

    def __init__(self, nvml: ModuleType | None = None, run: Callable[..., Any] = subprocess.run,
                 driver_root: str | None = None, load_library: Callable[[str], Any] = _load_library):
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py
        self._n = nvml
        self._run = run
        self._driver_root = driver_root or None
        self._load_library = load_library

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._n.NVMLError as e:  # type: ignore[attr-defined]
            code = getattr(e, "value", errors.UNKNOWN)
            if code == errors.LIBRARY_NOT_FOUND:
                raise errors.LibraryNotFoundError(
                    "cannot load libnvidia-ml.so.1: the NVIDIA driver is not installed or not visible to this "
                    "container (mount the driver root, or run on a GPU node); to try Partita without GPUs use "
                    "fake GPUs: `partita plugin --nvml fake --fake-profile FILE` or `partita inventory --fake "
                    "H100-SXM5-80GB:8`") from None
            raise errors.error_for_code(code, f"{what} failed") from None

    def _dev(self, h: Any) -> str:
        try:
            return _text(self._n.nvmlDeviceGetUUID(h))
        except Exception:  # noqa: BLE001 - only for messages
            return "<unknown GPU>"

    # -- lifecycle and system -------------------------------------------------------------------
    def init(self) -> None:
        if self._driver_root:
            path = find_nvml_library(self._driver_root)
            try:
                self._load_library(str(path))
            except OSError as e:
                raise errors.LibraryNotFoundError(
                    f"cannot load {path} (NVIDIA driver root {self._driver_root}): {e}") from None
        self._call("nvmlInit", self._n.nvmlInit)

    def shutdown(self) -> None:
        self._call("nvmlShutdown", self._n.nvmlShutdown)

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion", self._n.nvmlSystemGetDriverVersion))

    def cuda_driver_version(self) -> str:
        v = int(self._call("nvmlSystemGetCudaDriverVersion_v2", self._n.nvmlSystemGetCudaDriverVersion_v2))
        return f"{v // 1000}.{(v % 1000) // 10}"

    # -- devices --------------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount", self._n.nvmlDeviceGetCount))

    def device_by_index(self, index: int) -> Any:
        return self._call(f"nvmlDeviceGetHandleByIndex({index})", self._n.nvmlDeviceGetHandleByIndex, index)

    def device_by_uuid(self, uuid: str) -> Any:
        return self._call(f"nvmlDeviceGetHandleByUUID({uuid})", self._n.nvmlDeviceGetHandleByUUID, uuid)

    def device_info(self, h: Any) -> DeviceInfo:
        n = self._n
        uuid = _text(self._call("nvmlDeviceGetUUID", n.nvmlDeviceGetUUID, h))
        name = _text(self._call(f"nvmlDeviceGetName on {uuid}", n.nvmlDeviceGetName, h))
        brand = _BRAND.get(self._call(f"nvmlDeviceGetBrand on {uuid}", n.nvmlDeviceGetBrand, h), "Unknown")
        arch = _ARCH.get(self._call(f"nvmlDeviceGetArchitecture on {uuid}", n.nvmlDeviceGetArchitecture, h),
                         "Unknown")
        major, minor = self._call(f"nvmlDeviceGetCudaComputeCapability on {uuid}",
                                  n.nvmlDeviceGetCudaComputeCapability, h)
        mem = self._call(f"nvmlDeviceGetMemoryInfo on {uuid}", n.nvmlDeviceGetMemoryInfo, h)
        pci = self._call(f"nvmlDeviceGetPciInfo on {uuid}", n.nvmlDeviceGetPciInfo, h)
        bus_id = _normalize_bus_id(_text(pci.busId))
        try:
            numa: int | None = int(self._call(f"nvmlDeviceGetNumaNodeId on {uuid}", n.nvmlDeviceGetNumaNodeId, h))
        except errors.NvmlError:
            numa = None
        minor_number = int(self._call(f"nvmlDeviceGetMinorNumber on {uuid}", n.nvmlDeviceGetMinorNumber, h))
        return DeviceInfo(
            uuid=uuid, name=name, brand=brand, architecture=arch, cuda_compute_capability=f"{major}.{minor}",
            memory_total_bytes=int(mem.total), pci_bus_id=bus_id, pci_device_id=f"0x{int(pci.pciDeviceId):08X}",
            numa_node=numa if numa is not None and numa >= 0 else None, minor=minor_number,
            multiprocessors=self._multiprocessors(h, name), pcie_root=_pcie_root_from_sysfs(bus_id))

    def gpu_fabric_info(self, h: Any) -> GpuFabricInfo:
        """Read-only. The versioned call (``nvmlDeviceGetGpuFabricInfoV``, R535+) where this nvidia-ml-py and
        driver have it, else the original one; neither present: NotSupportedError."""
        n = self._n
        uuid = self._dev(h)
        calls = [("nvmlDeviceGetGpuFabricInfoV", "c_nvmlGpuFabricInfoV_t"),
                 ("nvmlDeviceGetGpuFabricInfo", "c_nvmlGpuFabricInfo_t")]
        for fn_name, struct_name in calls:
            fn, struct = getattr(n, fn_name, None), getattr(n, struct_name, None)
            if fn is None or struct is None:
                continue
            info = struct()
            try:
                self._call(f"{fn_name} on {uuid}", fn, h, ctypes.byref(info))
            except errors.NvmlError as e:
                if e.code == errors.FUNCTION_NOT_FOUND:
                    continue            # an older driver: try the original call
                raise
            raw = bytes(bytearray(info.clusterUuid))
            return GpuFabricInfo(cluster_uuid=str(uuidlib.UUID(bytes=raw.ljust(16, b"\0")[:16])),
                                 clique_id=int(info.cliqueId), state=int(info.state), status=int(info.status))
        raise errors.NotSupportedError(f"nvmlDeviceGetGpuFabricInfo is not available for {uuid} (nvidia-ml-py or "
                                       "driver too old)")

    def nvlink_p2p_status(self, h1: Any, h2: Any) -> int:
        """Read-only: ``nvmlDeviceGetP2PStatus`` for the NVLink capability. A driver that cannot answer
        (NOT_SUPPORTED) means no NVLink between the two."""
        n = self._n
        index = getattr(n, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
        try:
            return int(self._call(f"nvmlDeviceGetP2PStatus({self._dev(h1)}, {self._dev(h2)}, NVLINK)",
                                  n.nvmlDeviceGetP2PStatus, h1, h2, index))
        except errors.NotSupportedError:
            return P2P_STATUS_NOT_SUPPORTED

    def _multiprocessors(self, h: Any, name: str) -> int:
        try:
            attrs = self._n.nvmlDeviceGetAttributes_v2(h)
            if attrs.multiprocessorCount:
                return int(attrs.multiprocessorCount)
        except Exception:  # noqa: BLE001 - not every driver answers this for a whole GPU
            pass
        model = model_for_product_name(name)
        return model.multiprocessors if model else 0

    def running_processes(self, h: Any) -> list[int]:
        procs = self._call(f"nvmlDeviceGetComputeRunningProcesses on {self._dev(h)}",
                           self._n.nvmlDeviceGetComputeRunningProcesses, h)
        pids = [int(p.pid) for p in procs]
        try:
            for mig in self.mig_devices(h):
                mh = self._call("nvmlDeviceGetHandleByUUID", self._n.nvmlDeviceGetHandleByUUID, mig.uuid)
                pids += [int(p.pid) for p in self._call("nvmlDeviceGetComputeRunningProcesses",
                                                        self._n.nvmlDeviceGetComputeRunningProcesses, mh)]
        except errors.NotSupportedError:
            pass
        return sorted(set(pids))

    def is_healthy(self, h: Any) -> bool:
        try:
            self._call("nvmlDeviceGetMemoryInfo", self._n.nvmlDeviceGetMemoryInfo, h)
        except errors.GpuLostError:
            return False
        return True

    def compute_mode(self, h: Any) -> str:
        return _COMPUTE_MODE.get(self._call(f"nvmlDeviceGetComputeMode on {self._dev(h)}",
                                            self._n.nvmlDeviceGetComputeMode, h), COMPUTE_MODE_DEFAULT)

    def set_compute_mode(self, h: Any, mode: str) -> None:
        code = {v: k for k, v in _COMPUTE_MODE.items()}.get(mode)
        if code is None:
            raise errors.InvalidArgumentError(f"unknown compute mode {mode!r}")
        self._call(f"nvmlDeviceSetComputeMode({mode}) on {self._dev(h)}", self._n.nvmlDeviceSetComputeMode, h, code)

    def time_slice(self, h: Any) -> str:
        # nvidia-smi has no query for the compute time-slice; report what the driver resets it to.
        return "Default"

    def set_time_slice(self, h: Any, interval: str) -> None:
        if interval not in TIME_SLICE_INTERVALS:
            raise errors.InvalidArgumentError(f"unknown time-slice interval {interval!r}; use one of "
                                              f"{TIME_SLICE_INTERVALS}")
        smi = shutil.which("nvidia-smi")
        if smi is None:
            raise errors.NotSupportedError("nvidia-smi not found; it is needed to set the compute time-slice")
        uuid = self._dev(h)
        res = self._run([smi, "compute-policy", "-i", uuid, f"--set-timeslice={TIME_SLICE_INTERVALS.index(interval)}"],
                        capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise errors.NvmlError(f"nvidia-smi compute-policy --set-timeslice on {uuid} failed: "
                                   f"{(res.stderr or res.stdout).strip()}")

    # -- MIG ------------------------------------------------------------------------------------
    def mig_mode(self, h: Any) -> MigMode:
        current, pending = self._call(f"nvmlDeviceGetMigMode on {self._dev(h)}", self._n.nvmlDeviceGetMigMode, h)
        return MigMode(current=bool(current), pending=bool(pending))

    def set_mig_mode(self, h: Any, enabled: bool) -> bool:
        status = self._call(f"nvmlDeviceSetMigMode on {self._dev(h)}", self._n.nvmlDeviceSetMigMode, h,
                            1 if enabled else 0)
        if status in (0, None):
            return True
        if status == errors.RESET_REQUIRED:
            return False
        raise errors.error_for_code(int(status), f"activating MIG mode {'on' if enabled else 'off'} on {self._dev(h)}")

    def gpu_instance_profile_info(self, h: Any, nvml_constant: int) -> GpuInstanceProfileInfo:
        info = self._call(f"nvmlDeviceGetGpuInstanceProfileInfo({nvml_constant}) on {self._dev(h)}",
                          self._n.nvmlDeviceGetGpuInstanceProfileInfo, h, nvml_constant)
        name = _text(getattr(info, "name", b"")) or _profile_name(info, nvml_constant)
        return GpuInstanceProfileInfo(
            nvml_constant=nvml_constant, id=int(info.id), name=name.removeprefix("MIG "),
            slice_count=int(info.sliceCount), instance_count=int(info.instanceCount),
            multiprocessor_count=int(info.multiprocessorCount), copy_engine_count=int(info.copyEngineCount),
            decoder_count=int(info.decoderCount), encoder_count=int(info.encoderCount),
            jpeg_count=int(info.jpegCount), ofa_count=int(info.ofaCount), memory_size_mb=int(info.memorySizeMB))

    def gpu_instance_possible_placements(self, h: Any, profile_id: int) -> list[Placement]:
        n = self._n
        arr = (n.c_nvmlGpuInstancePlacement_t * 8)()
        count = ctypes.c_uint(len(arr))
        self._call(f"nvmlDeviceGetGpuInstancePossiblePlacements({profile_id}) on {self._dev(h)}",
                   n.nvmlDeviceGetGpuInstancePossiblePlacements, h, profile_id, arr, ctypes.byref(count))
        return [Placement(int(arr[i].start), int(arr[i].size)) for i in range(count.value)]

    def create_gpu_instance(self, h: Any, profile_id: int, placement: Placement) -> int:
        n = self._n
        p = n.c_nvmlGpuInstancePlacement_t()
        p.start, p.size = placement.start, placement.size
        gi = self._call(f"nvmlDeviceCreateGpuInstanceWithPlacement({profile_id} at {placement.start}:{placement.size}) "
                        f"on {self._dev(h)}", n.nvmlDeviceCreateGpuInstanceWithPlacement, h, profile_id, ctypes.byref(p))
        return int(self._call("nvmlGpuInstanceGetInfo", n.nvmlGpuInstanceGetInfo, gi).id)

    def _gi_handles(self, h: Any) -> list[Any]:
        n = self._n
        handles = []
        for const in range(19):
            try:
                info = self._call("nvmlDeviceGetGpuInstanceProfileInfo", n.nvmlDeviceGetGpuInstanceProfileInfo, h, const)
            except (errors.NotSupportedError, errors.InvalidArgumentError):
                continue
            arr = (n.c_nvmlGpuInstance_t * 8)()
            count = ctypes.c_uint(len(arr))
            self._call("nvmlDeviceGetGpuInstances", n.nvmlDeviceGetGpuInstances, h, info.id, arr, ctypes.byref(count))
            handles += [arr[i] for i in range(count.value)]
        return handles

    def gpu_instances(self, h: Any) -> list[GpuInstanceInfo]:
        out = []
        for gi in self._gi_handles(h):
            info = self._call("nvmlGpuInstanceGetInfo", self._n.nvmlGpuInstanceGetInfo, gi)
            out.append(GpuInstanceInfo(int(info.id), int(info.profileId),
                                       Placement(int(info.placement.start), int(info.placement.size))))
        return sorted(out, key=lambda i: i.id)

    def _gi_handle(self, h: Any, gpu_instance_id: int) -> Any:
        return self._call(f"nvmlDeviceGetGpuInstanceById({gpu_instance_id}) on {self._dev(h)}",
                          self._n.nvmlDeviceGetGpuInstanceById, h, gpu_instance_id)

    def destroy_gpu_instance(self, h: Any, gpu_instance_id: int) -> None:
        self._call(f"nvmlGpuInstanceDestroy({gpu_instance_id}) on {self._dev(h)}", self._n.nvmlGpuInstanceDestroy,
                   self._gi_handle(h, gpu_instance_id))

    def compute_instance_profile_info(self, h: Any, gpu_instance_id: int, nvml_constant: int) -> ComputeInstanceProfileInfo:
        info = self._call("nvmlGpuInstanceGetComputeInstanceProfileInfo",
                          self._n.nvmlGpuInstanceGetComputeInstanceProfileInfo,
                          self._gi_handle(h, gpu_instance_id), nvml_constant, 0)
        return ComputeInstanceProfileInfo(nvml_constant, int(info.id), int(info.sliceCount),
                                          int(info.multiprocessorCount))

    def create_compute_instance(self, h: Any, gpu_instance_id: int, profile_id: int) -> int:
        ci = self._call(f"nvmlGpuInstanceCreateComputeInstance({profile_id}) on GPU instance {gpu_instance_id} "
                        f"of {self._dev(h)}", self._n.nvmlGpuInstanceCreateComputeInstance,
                        self._gi_handle(h, gpu_instance_id), profile_id)
        return int(self._call("nvmlComputeInstanceGetInfo", self._n.nvmlComputeInstanceGetInfo, ci).id)

    def compute_instances(self, h: Any, gpu_instance_id: int) -> list[ComputeInstanceInfo]:
        n = self._n
        gi = self._gi_handle(h, gpu_instance_id)
        out = []
        for const in range(9):
            try:
                info = self._call("nvmlGpuInstanceGetComputeInstanceProfileInfo",
                                  n.nvmlGpuInstanceGetComputeInstanceProfileInfo, gi, const, 0)
            except (errors.NotSupportedError, errors.InvalidArgumentError):
                continue
            arr = (n.c_nvmlComputeInstance_t * 8)()
            count = ctypes.c_uint(len(arr))
            self._call("nvmlGpuInstanceGetComputeInstances", n.nvmlGpuInstanceGetComputeInstances, gi, info.id,
                       arr, ctypes.byref(count))
            for ci in (arr[i] for i in range(count.value)):
                ci_info = self._call("nvmlComputeInstanceGetInfo", n.nvmlComputeInstanceGetInfo, ci)
                out.append(ComputeInstanceInfo(int(ci_info.id), gpu_instance_id, int(ci_info.profileId)))
        return out

    def destroy_compute_instance(self, h: Any, gpu_instance_id: int, compute_instance_id: int) -> None:
        n = self._n
        ci = self._call("nvmlGpuInstanceGetComputeInstanceById", n.nvmlGpuInstanceGetComputeInstanceById,
                        self._gi_handle(h, gpu_instance_id), compute_instance_id)
        self._call(f"nvmlComputeInstanceDestroy({compute_instance_id}) on GPU instance {gpu_instance_id} of "
                   f"{self._dev(h)}", n.nvmlComputeInstanceDestroy, ci)

    def mig_devices(self, h: Any) -> list[MigDeviceInfo]:
        n = self._n
        profiles = {info.id: info for info, _ in self.gpu_instance_profiles(h)}
        gis = {gi.id: gi for gi in self.gpu_instances(h)}
        count = int(self._call("nvmlDeviceGetMaxMigDeviceCount", n.nvmlDeviceGetMaxMigDeviceCount, h))
        out = []
        for i in range(count):
            try:
                mh = self._call("nvmlDeviceGetMigDeviceHandleByIndex", n.nvmlDeviceGetMigDeviceHandleByIndex, h, i)
            except (errors.NotFoundError, errors.InvalidArgumentError):
                continue
            gi_id = int(self._call("nvmlDeviceGetGpuInstanceId", n.nvmlDeviceGetGpuInstanceId, mh))
            ci_id = int(self._call("nvmlDeviceGetComputeInstanceId", n.nvmlDeviceGetComputeInstanceId, mh))
            gi = gis.get(gi_id)
            prof = profiles.get(gi.profile_id) if gi else None
            attrs = self._call("nvmlDeviceGetAttributes_v2", n.nvmlDeviceGetAttributes_v2, mh)
            out.append(MigDeviceInfo(
                uuid=_text(self._call("nvmlDeviceGetUUID", n.nvmlDeviceGetUUID, mh)), gpu_instance_id=gi_id,
                compute_instance_id=ci_id, profile_id=gi.profile_id if gi else -1,
                profile_name=prof.name if prof else "unknown",
                placement=gi.placement if gi else Placement(0, 0), memory_mib=int(attrs.memorySizeMB),
                multiprocessors=int(attrs.multiprocessorCount)))
        return out

    # -- usage (issue 14) ---------------------------------------------------------------------------
    def utilization_rates(self, h: Any) -> Utilization:
        u = self._call(f"nvmlDeviceGetUtilizationRates on {self._dev(h)}", self._n.nvmlDeviceGetUtilizationRates, h)
        return Utilization(gpu=int(u.gpu), memory=int(u.memory))

    def memory_info(self, h: Any) -> MemoryInfo:
        m = self._call(f"nvmlDeviceGetMemoryInfo on {self._dev(h)}", self._n.nvmlDeviceGetMemoryInfo, h)
        return MemoryInfo(total=int(m.total), used=int(m.used), free=int(m.free))

    def compute_processes(self, h: Any) -> list[ProcessInfo]:
        procs = self._call(f"nvmlDeviceGetComputeRunningProcesses on {self._dev(h)}",
                           self._n.nvmlDeviceGetComputeRunningProcesses, h)
        return [ProcessInfo(pid=int(p.pid), used_gpu_memory=_available(getattr(p, "usedGpuMemory", None)),
                            gpu_instance_id=_available(getattr(p, "gpuInstanceId", None), _NA_UINT),
                            compute_instance_id=_available(getattr(p, "computeInstanceId", None), _NA_UINT))
                for p in procs]

    def process_utilization(self, h: Any, since_us: int = 0) -> list[ProcessUtilization]:
        try:
            samples = self._call(f"nvmlDeviceGetProcessUtilization on {self._dev(h)}",
                                 self._n.nvmlDeviceGetProcessUtilization, h, int(since_us))
        except errors.NotFoundError:       # no sample newer than since_us
            return []
        except errors.NvmlError as e:
            if e.code == 0:                # pynvml raises NVMLError(SUCCESS) when NVML has no sample at all
                return []
            raise
        by_pid: dict[int, ProcessUtilization] = {}
        for smp in samples:               # the newest sample of each process
            pu = ProcessUtilization(pid=int(smp.pid), timestamp_us=int(smp.timeStamp), sm_util=int(smp.smUtil),
                                    mem_util=int(smp.memUtil))
            if pu.pid not in by_pid or pu.timestamp_us > by_pid[pu.pid].timestamp_us:
                by_pid[pu.pid] = pu
        return sorted(by_pid.values(), key=lambda p: p.pid)

    def mig_device_handle(self, mig_uuid: str) -> Any:
        return self._call(f"nvmlDeviceGetHandleByUUID({mig_uuid})", self._n.nvmlDeviceGetHandleByUUID, mig_uuid)

    def mig_utilization(self, h: Any, gpu_instance_id: int) -> float | None:
        n = self._n
        uuid = self._dev(h)
        # kept on the instance without touching __init__ (this block stays separate from the health block)
        gpm = self.__dict__.setdefault("_gpm", {})            # (GPU UUID, GPU instance) -> previous sample
        support = self.__dict__.setdefault("_gpm_support", {})  # GPU UUID -> GPM supported
        if uuid not in support:
            try:
                support[uuid] = bool(self._call(f"nvmlGpmQueryDeviceSupport on {uuid}", n.nvmlGpmQueryDeviceSupport,
                                                h).isSupportedDevice)
            except (errors.NotSupportedError, AttributeError):   # AttributeError: nvidia-ml-py without GPM
                support[uuid] = False
        if not support[uuid]:
            raise errors.NotSupportedError(f"GPU {uuid} does not support GPU Performance Monitoring (Hopper and "
                                           "newer), which is how NVML reports a MIG instance's utilization")
        sample = self._call("nvmlGpmSampleAlloc", n.nvmlGpmSampleAlloc)
        try:
            self._call(f"nvmlGpmMigSampleGet on {uuid} GPU instance {gpu_instance_id}", n.nvmlGpmMigSampleGet, h,
                       gpu_instance_id, sample)
        except BaseException:
            n.nvmlGpmSampleFree(sample)
            raise
        prev = gpm.pop((uuid, gpu_instance_id), None)
        gpm[(uuid, gpu_instance_id)] = sample
        if prev is None:
            return None
        try:
            get = n.c_nvmlGpmMetricsGet_t()
            get.version = n.NVML_GPM_METRICS_GET_VERSION
            get.numMetrics = 1
            get.sample1, get.sample2 = prev, sample
            get.metrics[0].metricId = n.NVML_GPM_METRIC_GRAPHICS_UTIL
            self._call(f"nvmlGpmMetricsGet on {uuid} GPU instance {gpu_instance_id}", n.nvmlGpmMetricsGet, get)
            metric = get.metrics[0]
            if int(metric.nvmlReturn) != 0:
                raise errors.error_for_code(int(metric.nvmlReturn), f"GPM utilization of {uuid} GPU instance "
                                                                    f"{gpu_instance_id}")
            return float(metric.value)
        finally:
            n.nvmlGpmSampleFree(prev)

    # -- health events and checks (issue 13; driver/nvml/events.py) --------------------------------
    def event_set_create(self) -> Any:
        return self._call("nvmlEventSetCreate", self._n.nvmlEventSetCreate)

    def register_events(self, event_set: Any, h: Any, event_types: int) -> None:
        """Registers only the types the GPU supports (nvmlDeviceGetSupportedEventTypes); none of them:
        NotSupportedError (the monitor then checks the GPU periodically only)."""
        uuid = self._dev(h)
        supported = int(self._call(f"nvmlDeviceGetSupportedEventTypes on {uuid}",
                                   self._n.nvmlDeviceGetSupportedEventTypes, h))
        wanted = event_types & supported
        if not wanted:
            raise errors.NotSupportedError(f"GPU {uuid} reports none of the event types 0x{event_types:x} "
                                           f"(supported: 0x{supported:x})")
        self._call(f"nvmlDeviceRegisterEvents(0x{wanted:x}) on {uuid}", self._n.nvmlDeviceRegisterEvents, h,
                   wanted, event_set)

    def event_set_wait(self, event_set: Any, timeout_ms: int) -> HealthEvent | None:
        try:
            data = self._call("nvmlEventSetWait_v2", self._n.nvmlEventSetWait_v2, event_set, int(timeout_ms))
        except errors.NvmlError as e:
            if e.code == errors.TIMEOUT:
                return None
            raise
        etype = int(data.eventType)
        if etype & EVENT_TYPE_XID_CRITICAL:
            kind = EVENT_XID
        elif etype & EVENT_TYPE_DOUBLE_BIT_ECC:
            kind = EVENT_ECC_DBE
        else:
            return None          # not a health event type (never registered; ignore defensively)
        gi, ci = int(data.gpuInstanceId), int(data.computeInstanceId)
        return HealthEvent(gpu_uuid=self._dev(data.device), kind=kind, xid=int(data.eventData),
                           gpu_instance_id=None if gi == NO_INSTANCE else gi,
                           compute_instance_id=None if ci == NO_INSTANCE else ci)

    def event_set_free(self, event_set: Any) -> None:
        self._call("nvmlEventSetFree", self._n.nvmlEventSetFree, event_set)

    def health_check(self, h: Any) -> HealthCheck:
        """Read-only. GpuLostError when the GPU does not answer; each repair query the GPU or driver does
        not support (NOT_SUPPORTED, FUNCTION_NOT_FOUND) counts as nothing pending."""
        n = self._n
        uuid = self._dev(h)
        self._call(f"nvmlDeviceGetMemoryInfo on {uuid}", n.nvmlDeviceGetMemoryInfo, h)   # reachable at all?
        unsupported = (errors.NOT_SUPPORTED, errors.FUNCTION_NOT_FOUND)
        retired = False
        try:
            retired = int(self._call(f"nvmlDeviceGetRetiredPagesPendingStatus on {uuid}",
                                     n.nvmlDeviceGetRetiredPagesPendingStatus, h)) == 1
        except errors.NvmlError as e:
            if e.code not in unsupported:
                raise
        pending = failure = False
        try:
            _, _, p, f = self._call(f"nvmlDeviceGetRemappedRows on {uuid}", n.nvmlDeviceGetRemappedRows, h)
            pending, failure = bool(p), bool(f)
        except errors.NvmlError as e:
            if e.code not in unsupported:
                raise
        action = RECOVERY_ACTION_NONE
        try:
            values = self._call(f"nvmlDeviceGetFieldValues(GPU_RECOVERY_ACTION) on {uuid}",
                                n.nvmlDeviceGetFieldValues, h, [FIELD_GPU_RECOVERY_ACTION])
            v = values[0]
            if int(getattr(v, "nvmlReturn", 0)) == 0:
                action = int(v.value.uiVal)
        except errors.NvmlError as e:
            if e.code not in unsupported:
                raise
        return HealthCheck(retired_pages_pending=retired, remapped_rows_pending=pending,
                           remapped_rows_failure=failure, recovery_action=action)


#: NVML_VALUE_NOT_AVAILABLE for unsigned int fields (gpuInstanceId, computeInstanceId outside MIG mode)
_NA_UINT = 0xFFFFFFFF
_NA_ULONGLONG = 0xFFFFFFFFFFFFFFFF


def _available(v: Any, na: int = _NA_ULONGLONG) -> int | None:
    if v is None:
        return None
    v = int(v)
    return None if v == na else v


def _profile_name(info: Any, constant: int) -> str:
    gib = round(int(info.memorySizeMB) / 1024)
    return f"{int(info.sliceCount)}g.{gib}gb{_MIG_PROFILE_NAME_SUFFIX.get(constant, '')}"


def _normalize_bus_id(bus_id: str) -> str:
    """NVML prints ``00000000:1B:00.0``; Kubernetes and sysfs use ``0000:1b:00.0``."""
    domain, _, rest = bus_id.partition(":")
    return f"{int(domain, 16):04x}:{rest.lower()}"


def _pcie_root_from_sysfs(bus_id: str) -> str | None:
    """``pci<domain>:<bus>`` of the root complex above the GPU: the first path element under
    /sys/devices of the GPU's sysfs link, as k8s.io/dynamic-resource-allocation/deviceattribute does."""
    import os

    try:
        target = os.path.realpath(f"/sys/bus/pci/devices/{bus_id}")
    except OSError:
        return None
    parts = target.split("/")
    if len(parts) > 3 and parts[1] == "sys" and parts[2] == "devices" and parts[3].startswith("pci"):
        return parts[3]
    return None
