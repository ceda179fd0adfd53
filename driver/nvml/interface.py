"""The one NVML interface the driver talks to, with a real and a fake implementation.

Like an HTTP client's transport, the backend is chosen at construction (:func:`driver.nvml.open_backend`)
and nothing downstream knows which one it has. Methods are named for the NVML call they stand for;
results are small frozen dataclasses instead of ctypes structs; failures raise
:class:`driver.nvml.errors.NvmlError` subclasses carrying NVML's return code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

Handle = Any  # opaque: an index for the fake, a pynvml device handle for the real backend

# NVML_GPU_INSTANCE_PROFILE_* constants (nvml.h) for the profiles Partita publishes.
GI_PROFILE_1_SLICE = 0
GI_PROFILE_2_SLICE = 1
GI_PROFILE_3_SLICE = 2
GI_PROFILE_4_SLICE = 3
GI_PROFILE_7_SLICE = 4
GI_PROFILE_8_SLICE = 5
GI_PROFILE_6_SLICE = 6
GI_PROFILE_1_SLICE_REV1 = 7
GI_PROFILE_2_SLICE_REV1 = 8
GI_PROFILE_1_SLICE_REV2 = 9
GI_PROFILE_COUNT = 18

#: NVML_COMPUTE_INSTANCE_PROFILE_* constant for a compute instance spanning N compute slices.
CI_PROFILE_FOR_SLICES = {1: 0, 2: 1, 3: 2, 4: 3, 7: 4, 8: 5, 6: 6}

# nvmlComputeMode_t
#: GPU architectures whose MIG mode changes take effect without a GPU reset (NVIDIA MIG user guide: Hopper and
#: later); on older ones (Ampere) MIG mode is set by an administrator with a reset and Partita never changes it
MIG_MODE_WITHOUT_RESET = frozenset({"Hopper", "Blackwell"})
COMPUTE_MODE_DEFAULT = "Default"
COMPUTE_MODE_EXCLUSIVE_PROCESS = "ExclusiveProcess"
COMPUTE_MODE_PROHIBITED = "Prohibited"
COMPUTE_MODES = (COMPUTE_MODE_DEFAULT, COMPUTE_MODE_EXCLUSIVE_PROCESS, COMPUTE_MODE_PROHIBITED)

#: Compute time-slice intervals (``nvidia-smi compute-policy --set-timeslice`` 0..3).
TIME_SLICE_INTERVALS = ("Default", "Short", "Medium", "Long")


@dataclass(frozen=True)
class DeviceInfo:
    """Static facts about one physical GPU."""

    uuid: str
    name: str
    brand: str
    architecture: str
    cuda_compute_capability: str   # "9.0"
    memory_total_bytes: int
    pci_bus_id: str                # "0000:1b:00.0", lowercase
    pci_device_id: str             # "0x233010DE"
    numa_node: int | None
    minor: int
    multiprocessors: int
    pcie_root: str | None = None   # "pci0000:15" when known


#: nvmlGpuFabricState_t
FABRIC_STATE_NOT_SUPPORTED = 0
FABRIC_STATE_NOT_STARTED = 1
FABRIC_STATE_IN_PROGRESS = 2
FABRIC_STATE_COMPLETED = 3

#: nvmlGpuP2PStatus_t values Partita tells apart (every other value: no P2P over that link type)
P2P_STATUS_OK = 0
P2P_STATUS_NOT_SUPPORTED = 5


@dataclass(frozen=True)
class GpuFabricInfo:
    """``nvmlGpuFabricInfo_t`` / ``_v2_t``: the GPU's registration with the NVLink fabric (NVSwitch)."""

    cluster_uuid: str              # clusterUuid as 8-4-4-4-12 hex; all zeros when the GPU is in no cluster
    clique_id: int                 # cliqueId: GPUs of one cluster with the same clique reach each other over NVLink
    state: int                     # FABRIC_STATE_*
    status: int                    # NVML return code of the registration (0: success)


@dataclass(frozen=True)
class MigMode:
    current: bool
    pending: bool


@dataclass(frozen=True)
class Placement:
    """``nvmlGpuInstancePlacement_t``: first memory slice and number of memory slices."""

    start: int
    size: int

    def overlaps(self, other: "Placement") -> bool:
        return self.start < other.start + other.size and other.start < self.start + self.size


@dataclass(frozen=True)
class GpuInstanceProfileInfo:
    """``nvmlGpuInstanceProfileInfo_v2_t`` (the fields Partita uses)."""

    nvml_constant: int
    id: int                        # the profile ID nvidia-smi prints and CreateGpuInstance takes
    name: str                      # "1g.10gb", "1g.10gb+me"
    slice_count: int               # compute slices
    instance_count: int            # max instances
    multiprocessor_count: int
    copy_engine_count: int
    decoder_count: int
    encoder_count: int
    jpeg_count: int
    ofa_count: int
    memory_size_mb: int


@dataclass(frozen=True)
class ComputeInstanceProfileInfo:
    nvml_constant: int
    id: int
    slice_count: int
    multiprocessor_count: int


@dataclass(frozen=True)
class GpuInstanceInfo:
    id: int
    profile_id: int
    placement: Placement


@dataclass(frozen=True)
class ComputeInstanceInfo:
    id: int
    gpu_instance_id: int
    profile_id: int


@dataclass(frozen=True)
class MigDeviceInfo:
    """A MIG device: a GPU instance with a compute instance, as the driver exposes it."""

    uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    profile_id: int
    profile_name: str
    placement: Placement
    memory_mib: int
    multiprocessors: int


class NvmlBackend(ABC):
    """NVML as Partita uses it. One instance per process; call :meth:`init` before anything else."""

    kind: str = "abstract"

    # -- lifecycle and system -------------------------------------------------------------------
    @abstractmethod
    def init(self) -> None: ...

    @abstractmethod
    def shutdown(self) -> None: ...

    @abstractmethod
    def driver_version(self) -> str: ...

    @abstractmethod
    def cuda_driver_version(self) -> str:
        """``"13.0"`` (nvmlSystemGetCudaDriverVersion_v2 as major.minor)."""

    # -- devices --------------------------------------------------------------------------------
    @abstractmethod
    def device_count(self) -> int: ...

    @abstractmethod
    def device_by_index(self, index: int) -> Handle: ...

    @abstractmethod
    def device_by_uuid(self, uuid: str) -> Handle: ...

    @abstractmethod
    def device_info(self, h: Handle) -> DeviceInfo: ...

    @abstractmethod
    def gpu_fabric_info(self, h: Handle) -> GpuFabricInfo:
        """``nvmlDeviceGetGpuFabricInfoV``; NotSupportedError where the GPU has no NVLink fabric
        (GPUs before Hopper, PCIe boards)."""

    @abstractmethod
    def nvlink_p2p_status(self, h1: Handle, h2: Handle) -> int:
        """``nvmlDeviceGetP2PStatus(h1, h2, NVML_P2P_CAPS_INDEX_NVLINK)``: P2P_STATUS_OK when the two GPUs
        reach each other over NVLink (directly or through NVSwitch)."""

    @abstractmethod
    def running_processes(self, h: Handle) -> list[int]:
        """PIDs of compute processes on the GPU, including those on its MIG devices."""

    @abstractmethod
    def is_healthy(self, h: Handle) -> bool: ...

    @abstractmethod
    def compute_mode(self, h: Handle) -> str: ...

    @abstractmethod
    def set_compute_mode(self, h: Handle, mode: str) -> None: ...

    @abstractmethod
    def time_slice(self, h: Handle) -> str: ...

    @abstractmethod
    def set_time_slice(self, h: Handle, interval: str) -> None: ...

    # -- MIG ------------------------------------------------------------------------------------
    @abstractmethod
    def mig_mode(self, h: Handle) -> MigMode:
        """Raises NotSupportedError on GPUs without MIG."""

    @abstractmethod
    def set_mig_mode(self, h: Handle, enabled: bool) -> bool:
        """Request a MIG mode. Returns True when it is active now, False when it is pending a GPU
        reset (nvmlDeviceSetMigMode's activationStatus NVML_ERROR_RESET_REQUIRED). Raises InUseError
        when processes or GPU instances prevent the change."""

    @abstractmethod
    def gpu_instance_profile_info(self, h: Handle, nvml_constant: int) -> GpuInstanceProfileInfo: ...

    @abstractmethod
    def gpu_instance_possible_placements(self, h: Handle, profile_id: int) -> list[Placement]: ...

    @abstractmethod
    def create_gpu_instance(self, h: Handle, profile_id: int, placement: Placement) -> int:
        """nvmlDeviceCreateGpuInstanceWithPlacement; returns the GPU instance ID."""

    @abstractmethod
    def gpu_instances(self, h: Handle) -> list[GpuInstanceInfo]: ...

    @abstractmethod
    def destroy_gpu_instance(self, h: Handle, gpu_instance_id: int) -> None: ...

    @abstractmethod
    def compute_instance_profile_info(self, h: Handle, gpu_instance_id: int,
                                      nvml_constant: int) -> ComputeInstanceProfileInfo: ...

    @abstractmethod
    def create_compute_instance(self, h: Handle, gpu_instance_id: int, profile_id: int) -> int: ...

    @abstractmethod
    def compute_instances(self, h: Handle, gpu_instance_id: int) -> list[ComputeInstanceInfo]: ...

    @abstractmethod
    def destroy_compute_instance(self, h: Handle, gpu_instance_id: int, compute_instance_id: int) -> None: ...

    @abstractmethod
    def mig_devices(self, h: Handle) -> list[MigDeviceInfo]: ...

    # -- conveniences built on the calls above (shared by both backends) -------------------------
    def gpu_instance_profiles(self, h: Handle) -> list[tuple[GpuInstanceProfileInfo, list[Placement]]]:
        """Every GPU-instance profile the GPU supports, with its possible placements."""
        from .errors import InvalidArgumentError, NotSupportedError

        out: list[tuple[GpuInstanceProfileInfo, list[Placement]]] = []
        for const in range(GI_PROFILE_COUNT):
            try:
                info = self.gpu_instance_profile_info(h, const)
            except (NotSupportedError, InvalidArgumentError):
                continue
            out.append((info, self.gpu_instance_possible_placements(h, info.id)))
        return out

    def create_mig_device(self, h: Handle, profile_id: int, placement: Placement) -> MigDeviceInfo:
        """Create a GPU instance at a placement and one compute instance spanning it.

        On failure after the GPU instance exists, the GPU instance is destroyed again, so the GPU is
        left as it was."""
        from .errors import InvalidArgumentError

        gi = self.create_gpu_instance(h, profile_id, placement)
        try:
            infos = self.gpu_instance_profile_by_id(h, profile_id)
            if not infos:
                raise InvalidArgumentError(f"GPU instance profile {profile_id} is not supported by this GPU")
            ci_const = CI_PROFILE_FOR_SLICES[infos[0].slice_count]
            ci_info = self.compute_instance_profile_info(h, gi, ci_const)
            ci = self.create_compute_instance(h, gi, ci_info.id)
        except BaseException:
            self.destroy_gpu_instance(h, gi)
            raise
        return next(d for d in self.mig_devices(h) if d.gpu_instance_id == gi and d.compute_instance_id == ci)

    def gpu_instance_profile_by_id(self, h: Handle, profile_id: int) -> Sequence[GpuInstanceProfileInfo]:
        return [info for info, _ in self.gpu_instance_profiles(h) if info.id == profile_id]

    def destroy_mig_device(self, h: Handle, gpu_instance_id: int) -> None:
        """Destroy every compute instance of a GPU instance, then the GPU instance."""
        for ci in self.compute_instances(h, gpu_instance_id):
            self.destroy_compute_instance(h, gpu_instance_id, ci.id)
        self.destroy_gpu_instance(h, gpu_instance_id)

    # -- health events and checks (issue 13; types in driver/nvml/events.py) ------------------------
    # Not abstract: a backend without them answers NotSupportedError and the health monitor reports the
    # GPU as unmonitored instead of failing.
    def event_set_create(self) -> Any:
        """``nvmlEventSetCreate``."""
        from .errors import NotSupportedError

        raise NotSupportedError(f"NVML events are not supported by the {self.kind} backend")

    def register_events(self, event_set: Any, h: Handle, event_types: int) -> None:
        """``nvmlDeviceRegisterEvents``; NotSupportedError when the GPU cannot report these event types."""
        from .errors import NotSupportedError

        raise NotSupportedError(f"NVML events are not supported by the {self.kind} backend")

    def event_set_wait(self, event_set: Any, timeout_ms: int) -> "HealthEvent | None":
        """``nvmlEventSetWait_v2``: the next registered event, or None when none came within ``timeout_ms``."""
        from .errors import NotSupportedError

        raise NotSupportedError(f"NVML events are not supported by the {self.kind} backend")

    def event_set_free(self, event_set: Any) -> None:
        """``nvmlEventSetFree``."""

    def health_check(self, h: Handle) -> "HealthCheck":
        """Pending repairs of one GPU (retired pages, remapped rows, the driver's recovery action);
        GpuLostError when the GPU does not answer."""
        from .errors import NotSupportedError

        raise NotSupportedError(f"GPU health checks are not supported by the {self.kind} backend")

    # -- usage (issue 14): utilization, memory, processes; what NVML refuses on MIG is noted per call ---------
    @abstractmethod
    def utilization_rates(self, h: Handle) -> Utilization:
        """``nvmlDeviceGetUtilizationRates``: percent of the last sample period (1/6 s to 1 s by product) in
        which a kernel ran, and the memory controller was busy. NotSupportedError on a MIG device handle and
        on a GPU in MIG mode (nvidia-smi prints N/A there)."""

    @abstractmethod
    def memory_info(self, h: Handle) -> MemoryInfo:
        """``nvmlDeviceGetMemoryInfo``: of the GPU, or of the MIG instance for a MIG device handle."""

    @abstractmethod
    def compute_processes(self, h: Handle) -> list[ProcessInfo]:
        """``nvmlDeviceGetComputeRunningProcesses``: on a GPU all its compute processes (in MIG mode with the
        GPU and compute instance each runs on), on a MIG device handle that instance's."""

    @abstractmethod
    def process_utilization(self, h: Handle, since_us: int = 0) -> list[ProcessUtilization]:
        """``nvmlDeviceGetProcessUtilization``: per process, its SM and memory utilization over the samples
        newer than ``since_us`` (microseconds since the epoch; 0: every buffered sample); ``[]`` when there
        is none (NVML answers NOT_FOUND). NotSupportedError on MIG device handles and GPUs in MIG mode, and on
        GPUs before Maxwell."""

    @abstractmethod
    def mig_device_handle(self, mig_uuid: str) -> Handle:
        """``nvmlDeviceGetHandleByUUID`` of a MIG device (``MIG-...``)."""

    @abstractmethod
    def mig_utilization(self, h: Handle, gpu_instance_id: int) -> float | None:
        """Utilization (percent, 0..100: time a kernel ran) of a GPU instance since the previous call for it,
        from GPU Performance Monitoring (``nvmlGpmMigSampleGet`` and ``nvmlGpmMetricsGet`` with
        NVML_GPM_METRIC_GRAPHICS_UTIL): None on the first call (one sample only). NotSupportedError where GPM
        is not supported (GPUs before Hopper), the only way NVML reports a MIG instance's utilization."""


# -- usage (issue 14) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Utilization:
    """``nvmlUtilization_t``, percent."""

    gpu: int
    memory: int


@dataclass(frozen=True)
class MemoryInfo:
    """``nvmlMemory_t``, bytes."""

    total: int
    used: int
    free: int


@dataclass(frozen=True)
class ProcessInfo:
    """``nvmlProcessInfo_t``: ``used_gpu_memory`` None where NVML does not say (NVML_VALUE_NOT_AVAILABLE, e.g.
    Windows WDDM or without permission); the instance ids None outside MIG mode."""

    pid: int
    used_gpu_memory: int | None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class ProcessUtilization:
    """``nvmlProcessUtilizationSample_t``: percent; ``timestamp_us`` of the newest sample."""

    pid: int
    timestamp_us: int
    sm_util: int
    mem_util: int


from typing import TYPE_CHECKING  # noqa: E402 - with the health block above, kept apart from the original imports

if TYPE_CHECKING:
    from .events import HealthCheck, HealthEvent
