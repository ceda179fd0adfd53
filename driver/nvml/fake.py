"""Fake NVML: GPUs from a profile file that behave like hardware, refusals included.

What it models, and the NVML behaviour each rule follows (return codes from the nvml.h API docs,
NVIDIA/go-nvml pkg/nvml/nvml.h):

* Identity: GPU UUIDs are uuid5(node name, slot) — stable for a node and slot, different across
  nodes; MIG device UUIDs derive from the GPU UUID, the GPU/compute instance IDs and the placement.
* MIG mode (nvmlDeviceSetMigMode): NOT_SUPPORTED on GPUs without MIG. With compute processes on the
  GPU, or GPU instances still present when disabling, the change is refused with IN_USE ("if device
  unbind fails because the device isn't idle, NVML_ERROR_IN_USE"). Hopper and newer switch at once.
  Ampere needs a GPU reset to apply a new mode: the pending mode is recorded, activationStatus is
  NVML_ERROR_RESET_REQUIRED and the current mode stays until a reset (which the fake never does), so
  on Ampere MIG is usable only when it was already enabled at boot (profile ``migEnabled: true``).
* GPU instances (nvmlDeviceCreateGpuInstanceWithPlacement): NOT_SUPPORTED while MIG is disabled;
  INVALID_ARGUMENT for an unknown profile ID or a placement the profile does not offer
  (nvmlDeviceGetGpuInstancePossiblePlacements); INSUFFICIENT_RESOURCES when the placement overlaps an
  existing instance, the profile's instance count or the GPU's instance/compute-slice budget is used up.
  nvmlGpuInstanceDestroy: IN_USE while compute instances exist.
* Compute instances: INSUFFICIENT_RESOURCES beyond the GPU instance's compute slices;
  nvmlComputeInstanceDestroy: IN_USE while processes run on the MIG device.
* Profile info carries the real profile IDs (19, 20, 15, 14, 9, 5, 0), never the constant index.
* Usage (utilization, memory, processes): per-process load from the profile (``load`` of a GPU group: one
  background process per GPU) and from the usage file ``usage.json`` in the state directory, which the
  sandbox and tests write to inject low or high load; refusals as NVML's on MIG (see the usage block).

Hardware state outlives processes: with a state directory the mutable state (MIG mode, instances,
processes, compute mode, time-slice, health) lives in ``state.json`` there, written atomically under
an flock and re-read when it changed, so a restarted plugin sees what it created before, and two
backends on one directory see each other's changes.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fcntl
import json
import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import errors
from .interface import (
    MIG_MODE_WITHOUT_RESET,
    CI_PROFILE_FOR_SLICES,
    COMPUTE_MODES,
    FABRIC_STATE_COMPLETED,
    P2P_STATUS_NOT_SUPPORTED,
    P2P_STATUS_OK,
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
    EVENT_TYPE_CLOCK,
    EVENT_TYPE_DOUBLE_BIT_ECC,
    EVENT_TYPE_PSTATE,
    EVENT_TYPE_SINGLE_BIT_ECC,
    EVENT_TYPE_XID_CRITICAL,
    EVENT_XID,
    RECOVERY_ACTION_NONE,
    XID_DBE,
    XID_FALLEN_OFF_BUS,
    HealthCheck,
    HealthEvent,
)
from .interface import MemoryInfo, ProcessInfo, ProcessUtilization, Utilization
from .models import GpuModel, get_model, interconnect, slot_layout
from .profile import RECOVERY_ACTION_NAMES, FakeGpuProfile, HealthInjection, InjectionError, NodeProfile, parse_injection

_UUID_NAMESPACE = uuidlib.UUID("6f1d4b2e-9a57-4c1e-8f0a-5a17c0de9a11")
_STATE_VERSION = 1
#: architectures whose GPUs register with an NVLink fabric and answer nvmlDeviceGetGpuFabricInfoV
_FABRIC_ARCHITECTURES = {"Hopper", "Blackwell"}
#: architectures that retire pages after a DBE (later ones remap rows)
_RETIRED_PAGES_ARCHITECTURES = {"Kepler", "Maxwell", "Pascal", "Volta", "Turing"}
#: how often a waiting event set looks at the events file; events queued per set (NVML's buffer is bounded)
_EVENTS_POLL_SECONDS = 0.02
_MAX_QUEUED_EVENTS = 10000
_MAX_EVENTS_READ = 4 * 1024 * 1024
_log = logging.getLogger(__name__)


#: the usage file in the state directory: per-process load the sandbox and tests inject (FakeNvml usage block)
USAGE_FILE = "usage.json"
#: pid of a GPU's background process from the profile's ``load``: this plus the GPU's slot
PROFILE_LOAD_PID = 900000


@dataclass(frozen=True)
class _MigHandle:
    """A MIG device handle (nvmlDeviceGetHandleByUUID of a MIG UUID)."""

    slot: int
    uuid: str


def _mem_util(p: dict[str, Any]) -> int:
    return int(p.get("memUtil", p["smUtil"] // 2))


def _load_problem(pid: str, p: Any) -> str:
    """What is wrong with one process's load, or ""."""
    if not str(pid).isdigit() or int(pid) <= 0:
        return "the pid must be a positive integer"
    if not isinstance(p, dict) or not isinstance(p.get("device"), str):
        return "needs \"device\": the UUID of a GPU (GPU-...) or MIG device (MIG-...)"
    for key, hi in (("smUtil", 100), ("memUtil", 100), ("memoryUsedBytes", None)):
        v = p.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (hi is not None and v > hi):
            return f"{key} must be an integer from 0 to {hi}" if hi else f"{key} must be a non-negative integer"
    unknown = set(p) - {"device", "smUtil", "memUtil", "memoryUsedBytes"}
    if unknown:
        return f"unknown fields {sorted(unknown)} (fields: device, smUtil, memUtil, memoryUsedBytes)"
    return ""


def fake_gpu_uuid(node_name: str, slot: int) -> str:
    return f"GPU-{uuidlib.uuid5(_UUID_NAMESPACE, f'{node_name}/{slot}')}"


def fake_fabric_cluster_uuid(node_name: str) -> str:
    """The NVLink fabric cluster of a node's NVSwitch board (one clique per node)."""
    return str(uuidlib.uuid5(_UUID_NAMESPACE, f"{node_name}/nvlink-fabric"))


def fake_mig_uuid(gpu_uuid: str, gi: int, ci: int, start: int) -> str:
    return f"MIG-{uuidlib.uuid5(_UUID_NAMESPACE, f'{gpu_uuid}/{gi}/{ci}/{start}')}"


class _Gpu:
    """Static facts of one fake GPU (from the profile and the model table)."""

    def __init__(self, node: str, slot: int, model: GpuModel, mig_at_boot: bool, healthy: bool):
        self.slot = slot
        self.node = node
        self.model = model
        self.nvswitch = interconnect(model.system).nvlink == "nvswitch"
        self.uuid = fake_gpu_uuid(node, slot)
        self.mig_at_boot = mig_at_boot
        self.healthy_at_boot = healthy
        layout = slot_layout(model.system, slot)
        self.info = DeviceInfo(
            uuid=self.uuid, name=model.product_name, brand=model.brand, architecture=model.architecture,
            cuda_compute_capability=model.cuda_compute_capability,
            memory_total_bytes=model.memory_mib * 1024 * 1024, pci_bus_id=layout.bus_id,
            pci_device_id=model.pci_device_id, numa_node=layout.numa_node, minor=slot,
            multiprocessors=model.multiprocessors, pcie_root=layout.pcie_root,
        )

    def initial_state(self) -> dict[str, Any]:
        return {"migCurrent": self.mig_at_boot, "migPending": self.mig_at_boot, "computeMode": "Default",
                "timeSlice": "Default", "healthy": self.healthy_at_boot, "processes": [], "gpuInstances": []}


class FakeNvml(NvmlBackend):
    kind = "fake"

    def __init__(self, profile: FakeGpuProfile, node_name: str, state_dir: str | Path | None = None):
        self._node_name = node_name
        self._profile = profile
        node: NodeProfile = profile.node(node_name)
        self._gpus = [_Gpu(node_name, slot, get_model(m), mig, healthy)
                      for slot, (m, mig, healthy) in enumerate(node.gpu_list())]
        self._by_uuid = {g.uuid: g for g in self._gpus}
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._state: dict[str, Any] = {}
        self._stamp: tuple[int, int] | None = None
        self._initialized = False
        if self._state_dir is not None:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            with self._locked():
                self._save(self._load_fresh())
        else:
            self._state = self._fill({})

    # -- state persistence ----------------------------------------------------------------------
    @property
    def _state_file(self) -> Path:
        assert self._state_dir is not None
        return self._state_dir / "state.json"

    def _fill(self, state: dict[str, Any]) -> dict[str, Any]:
        gpus = state.setdefault("gpus", {})
        for g in self._gpus:
            gpus.setdefault(g.uuid, g.initial_state())
        state["version"] = _STATE_VERSION
        return state

    def _load_fresh(self) -> dict[str, Any]:
        try:
            raw = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as e:
            raise errors.NvmlError(f"fake NVML state {self._state_file} is unreadable ({e}); delete it to "
                                   "start the fake GPUs from their profile again") from None
        if raw and raw.get("version") != _STATE_VERSION:
            raise errors.NvmlError(f"fake NVML state {self._state_file} has version {raw.get('version')!r}, "
                                   f"expected {_STATE_VERSION}; delete it to reset the fake GPUs")
        return self._fill(raw)

    def _save(self, state: dict[str, Any]) -> None:
        self._state = state
        if self._state_dir is None:
            return
        tmp = self._state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_file)
        st = self._state_file.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._state_dir is None:
            yield
            return
        with open(self._state_dir / "state.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        if self._state_dir is not None:
            try:
                st = self._state_file.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._stamp or not self._state:
                with self._locked():
                    self._state = self._load_fresh()
                    self._stamp = stamp
        return self._state

    @contextlib.contextmanager
    def _mutate(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the state; nothing is saved when the block raises."""
        with self._locked():
            state = self._load_fresh() if self._state_dir is not None else copy.deepcopy(self._state)
            yield state
            self._save(state)

    # -- helpers --------------------------------------------------------------------------------
    def _check_init(self) -> None:
        if not self._initialized:
            raise errors.UninitializedError("NVML is not initialized; call init() first")

    def _handle(self, h: int) -> _Gpu:
        self._check_init()
        if not isinstance(h, int) or not 0 <= h < len(self._gpus):
            raise errors.InvalidArgumentError(f"invalid device handle {h!r}")
        return self._gpus[h]

    def _gpu(self, h: int) -> _Gpu:
        """A GPU that answers: one that fell off the bus answers GPU_IS_LOST to every call until a reset."""
        g = self._handle(h)
        if not self._read()["gpus"][g.uuid]["healthy"]:
            raise errors.GpuLostError(f"GPU {g.uuid} has fallen off the bus; reset it (fake: inject "
                                      "{\"kind\": \"reset\"}) or reboot the node")
        return g

    def _mig_gpu(self, h: int) -> _Gpu:
        g = self._gpu(h)
        if g.model.mig is None:
            raise errors.NotSupportedError(f"GPU {g.uuid} ({g.model.product_name}) does not support MIG")
        return g

    @staticmethod
    def _gi(st: dict[str, Any], g: _Gpu, gi_id: int) -> dict[str, Any]:
        for gi in st["gpuInstances"]:
            if gi["id"] == gi_id:
                return gi
        raise errors.NotFoundError(f"GPU {g.uuid} has no GPU instance {gi_id}")

    def _all_processes(self, st: dict[str, Any]) -> list[int]:
        pids = list(st["processes"])
        for gi in st["gpuInstances"]:
            for ci in gi["computeInstances"]:
                pids.extend(ci["processes"])
        return pids

    # -- lifecycle and system -------------------------------------------------------------------
    def init(self) -> None:
        self._initialized = True

    def shutdown(self) -> None:
        self._initialized = False

    def driver_version(self) -> str:
        self._check_init()
        return self._profile.driver_version

    def cuda_driver_version(self) -> str:
        self._check_init()
        return self._profile.cuda_driver_version

    # -- devices --------------------------------------------------------------------------------
    def device_count(self) -> int:
        self._check_init()
        return len(self._gpus)

    def device_by_index(self, index: int) -> int:
        self._check_init()
        if not 0 <= index < len(self._gpus):
            raise errors.InvalidArgumentError(f"no GPU with index {index} (this node has {len(self._gpus)})")
        return index

    def device_by_uuid(self, uuid: str) -> int:
        self._check_init()
        g = self._by_uuid.get(uuid)
        if g is None:
            raise errors.NotFoundError(f"no GPU with UUID {uuid} on node {self._node_name}")
        return g.slot

    def device_info(self, h: int) -> DeviceInfo:
        return self._handle(h).info    # identity read at init: answered even for a lost GPU

    def gpu_fabric_info(self, h: int) -> GpuFabricInfo:
        g = self._gpu(h)
        if not g.nvswitch or g.model.architecture not in _FABRIC_ARCHITECTURES:
            raise errors.NotSupportedError(f"GPU {g.uuid} ({g.model.product_name}) reports no NVLink fabric "
                                           "information")
        return GpuFabricInfo(cluster_uuid=fake_fabric_cluster_uuid(g.node), clique_id=1,
                             state=FABRIC_STATE_COMPLETED, status=0)

    def nvlink_p2p_status(self, h1: int, h2: int) -> int:
        a, b = self._gpu(h1), self._gpu(h2)
        if a is b:
            raise errors.InvalidArgumentError(f"P2P status of GPU {a.uuid} with itself")
        # NVSwitch boards connect GPUs of one board: the same model in the same system
        if a.nvswitch and b.nvswitch and a.model.key == b.model.key:
            return P2P_STATUS_OK
        return P2P_STATUS_NOT_SUPPORTED

    def model_of(self, h: int) -> GpuModel:
        return self._handle(h).model

    def running_processes(self, h: int) -> list[int]:
        g = self._gpu(h)
        return self._all_processes(self._read()["gpus"][g.uuid])

    def is_healthy(self, h: int) -> bool:
        g = self._handle(h)
        return bool(self._read()["gpus"][g.uuid]["healthy"])

    def compute_mode(self, h: int) -> str:
        g = self._gpu(h)
        return self._read()["gpus"][g.uuid]["computeMode"]

    def set_compute_mode(self, h: int, mode: str) -> None:
        g = self._gpu(h)
        if mode not in COMPUTE_MODES:
            raise errors.InvalidArgumentError(f"unknown compute mode {mode!r}; use one of {COMPUTE_MODES}")
        with self._mutate() as state:
            state["gpus"][g.uuid]["computeMode"] = mode

    def time_slice(self, h: int) -> str:
        g = self._gpu(h)
        return self._read()["gpus"][g.uuid]["timeSlice"]

    def set_time_slice(self, h: int, interval: str) -> None:
        g = self._gpu(h)
        if interval not in TIME_SLICE_INTERVALS:
            raise errors.InvalidArgumentError(f"unknown time-slice interval {interval!r}; use one of "
                                              f"{TIME_SLICE_INTERVALS}")
        with self._mutate() as state:
            st = state["gpus"][g.uuid]
            if st["migCurrent"]:
                raise errors.NotSupportedError(f"GPU {g.uuid} is in MIG mode; compute time-slices apply to "
                                               "whole GPUs only")
            st["timeSlice"] = interval

    # -- MIG ------------------------------------------------------------------------------------
    def mig_mode(self, h: int) -> MigMode:
        g = self._mig_gpu(h)
        st = self._read()["gpus"][g.uuid]
        return MigMode(current=st["migCurrent"], pending=st["migPending"])

    def set_mig_mode(self, h: int, enabled: bool) -> bool:
        g = self._mig_gpu(h)
        with self._mutate() as state:
            st = state["gpus"][g.uuid]
            if st["migCurrent"] == enabled and st["migPending"] == enabled:
                return True
            pids = self._all_processes(st)
            if pids:
                raise errors.InUseError(f"cannot {'enable' if enabled else 'disable'} MIG on GPU {g.uuid}: "
                                        f"processes {sorted(pids)} are running on it; stop them first")
            if not enabled and st["gpuInstances"]:
                raise errors.InUseError(f"cannot disable MIG on GPU {g.uuid}: GPU instances "
                                        f"{[gi['id'] for gi in st['gpuInstances']]} exist; destroy them first")
            st["migPending"] = enabled
            if g.model.architecture in MIG_MODE_WITHOUT_RESET:
                st["migCurrent"] = enabled
                if not enabled:
                    st["timeSlice"] = st.get("timeSlice", "Default")
                return True
            return st["migCurrent"] == enabled  # Ampere: pending until a GPU reset

    def _profile_info(self, g: _Gpu, spec) -> GpuInstanceProfileInfo:  # noqa: ANN001
        return GpuInstanceProfileInfo(
            nvml_constant=spec.nvml_constant, id=spec.id, name=spec.name, slice_count=spec.compute_slices,
            instance_count=spec.max_instances, multiprocessor_count=spec.multiprocessors,
            copy_engine_count=spec.copy_engines, decoder_count=spec.decoders, encoder_count=spec.encoders,
            jpeg_count=spec.jpeg_engines, ofa_count=spec.ofa_engines, memory_size_mb=spec.memory_mib)

    def gpu_instance_profile_info(self, h: int, nvml_constant: int) -> GpuInstanceProfileInfo:
        g = self._mig_gpu(h)
        spec = g.model.profile_by_constant(nvml_constant)
        if spec is None:
            raise errors.NotSupportedError(f"GPU {g.uuid} ({g.model.product_name}) has no GPU instance "
                                           f"profile for NVML constant {nvml_constant}")
        return self._profile_info(g, spec)

    def gpu_instance_possible_placements(self, h: int, profile_id: int) -> list[Placement]:
        g = self._mig_gpu(h)
        spec = g.model.profile_by_id(profile_id)
        if spec is None:
            raise errors.InvalidArgumentError(f"GPU {g.uuid} has no GPU instance profile with ID {profile_id}")
        return [Placement(s, spec.memory_slices) for s in spec.placement_starts]

    def create_gpu_instance(self, h: int, profile_id: int, placement: Placement) -> int:
        g = self._mig_gpu(h)
        mig = g.model.mig
        assert mig is not None
        spec = g.model.profile_by_id(profile_id)
        if spec is None:
            raise errors.InvalidArgumentError(f"GPU {g.uuid} has no GPU instance profile with ID {profile_id}")
        with self._mutate() as state:
            st = state["gpus"][g.uuid]
            if not st["migCurrent"]:
                raise errors.NotSupportedError(f"MIG mode is not enabled on GPU {g.uuid}; enable it before "
                                               "creating GPU instances")
            if placement.size != spec.memory_slices or placement.start not in spec.placement_starts:
                valid = ", ".join(f"{s}:{spec.memory_slices}" for s in spec.placement_starts)
                raise errors.InvalidArgumentError(
                    f"placement {placement.start}:{placement.size} is not valid for profile {spec.name} "
                    f"(ID {profile_id}) on GPU {g.uuid}; valid placements: {valid}")
            existing = st["gpuInstances"]
            for gi in existing:
                other = Placement(gi["start"], gi["size"])
                if other.overlaps(placement):
                    raise errors.InsufficientResourcesError(
                        f"placement {placement.start}:{placement.size} on GPU {g.uuid} overlaps GPU instance "
                        f"{gi['id']} at {other.start}:{other.size}")
            same = sum(1 for gi in existing if gi["profileId"] == profile_id)
            if same >= spec.max_instances:
                raise errors.InsufficientResourcesError(
                    f"GPU {g.uuid} already has {same} instance(s) of profile {spec.name}, its maximum")
            if len(existing) >= mig.max_gpu_instances:
                raise errors.InsufficientResourcesError(f"GPU {g.uuid} already has {len(existing)} GPU "
                                                        "instances, its maximum")
            used = sum(g.model.profile_by_id(gi["profileId"]).compute_slices for gi in existing)  # type: ignore[union-attr]
            if used + spec.compute_slices > mig.compute_slices:
                raise errors.InsufficientResourcesError(
                    f"GPU {g.uuid} has {mig.compute_slices - used} free compute slices; {spec.name} needs "
                    f"{spec.compute_slices}")
            ids = {gi["id"] for gi in existing}
            gi_id = next(i for i in range(1, 64) if i not in ids)
            existing.append({"id": gi_id, "profileId": profile_id, "start": placement.start,
                             "size": placement.size, "computeInstances": []})
            return gi_id

    def gpu_instances(self, h: int) -> list[GpuInstanceInfo]:
        g = self._mig_gpu(h)
        st = self._read()["gpus"][g.uuid]
        return [GpuInstanceInfo(gi["id"], gi["profileId"], Placement(gi["start"], gi["size"]))
                for gi in sorted(st["gpuInstances"], key=lambda x: x["id"])]

    def destroy_gpu_instance(self, h: int, gpu_instance_id: int) -> None:
        g = self._mig_gpu(h)
        with self._mutate() as state:
            st = state["gpus"][g.uuid]
            gi = self._gi(st, g, gpu_instance_id)
            if gi["computeInstances"]:
                raise errors.InUseError(f"GPU instance {gpu_instance_id} on GPU {g.uuid} still has compute "
                                        f"instances {[ci['id'] for ci in gi['computeInstances']]}; destroy them first")
            st["gpuInstances"].remove(gi)

    def _ci_profile(self, g: _Gpu, gi: dict[str, Any], nvml_constant: int) -> ComputeInstanceProfileInfo:
        slices = next((s for s, c in CI_PROFILE_FOR_SLICES.items() if c == nvml_constant), None)
        gi_spec = g.model.profile_by_id(gi["profileId"])
        assert gi_spec is not None
        if slices is None or slices > gi_spec.compute_slices:
            raise errors.NotSupportedError(f"compute instance profile {nvml_constant} does not fit GPU instance "
                                           f"{gi['id']} ({gi_spec.name}) on GPU {g.uuid}")
        sms = gi_spec.multiprocessors * slices // gi_spec.compute_slices
        return ComputeInstanceProfileInfo(nvml_constant=nvml_constant, id=nvml_constant, slice_count=slices,
                                          multiprocessor_count=sms)

    def compute_instance_profile_info(self, h: int, gpu_instance_id: int,
                                      nvml_constant: int) -> ComputeInstanceProfileInfo:
        g = self._mig_gpu(h)
        gi = self._gi(self._read()["gpus"][g.uuid], g, gpu_instance_id)
        return self._ci_profile(g, gi, nvml_constant)

    def create_compute_instance(self, h: int, gpu_instance_id: int, profile_id: int) -> int:
        g = self._mig_gpu(h)
        with self._mutate() as state:
            st = state["gpus"][g.uuid]
            gi = self._gi(st, g, gpu_instance_id)
            ci_profile = self._ci_profile(g, gi, profile_id)
            gi_spec = g.model.profile_by_id(gi["profileId"])
            assert gi_spec is not None
            used = sum(c["slices"] for c in gi["computeInstances"])
            if used + ci_profile.slice_count > gi_spec.compute_slices:
                raise errors.InsufficientResourcesError(
                    f"GPU instance {gpu_instance_id} on GPU {g.uuid} has {gi_spec.compute_slices - used} free "
                    f"compute slices; compute profile {profile_id} needs {ci_profile.slice_count}")
            ids = {c["id"] for c in gi["computeInstances"]}
            ci_id = next(i for i in range(0, 64) if i not in ids)
            gi["computeInstances"].append({"id": ci_id, "profileId": profile_id, "slices": ci_profile.slice_count,
                                           "processes": []})
            return ci_id

    def compute_instances(self, h: int, gpu_instance_id: int) -> list[ComputeInstanceInfo]:
        g = self._mig_gpu(h)
        gi = self._gi(self._read()["gpus"][g.uuid], g, gpu_instance_id)
        return [ComputeInstanceInfo(c["id"], gpu_instance_id, c["profileId"]) for c in gi["computeInstances"]]

    def destroy_compute_instance(self, h: int, gpu_instance_id: int, compute_instance_id: int) -> None:
        g = self._mig_gpu(h)
        with self._mutate() as state:
            gi = self._gi(state["gpus"][g.uuid], g, gpu_instance_id)
            ci = next((c for c in gi["computeInstances"] if c["id"] == compute_instance_id), None)
            if ci is None:
                raise errors.NotFoundError(f"GPU instance {gpu_instance_id} on GPU {g.uuid} has no compute "
                                           f"instance {compute_instance_id}")
            if ci["processes"]:
                raise errors.InUseError(f"processes {ci['processes']} run on compute instance "
                                        f"{compute_instance_id} of GPU instance {gpu_instance_id} on GPU {g.uuid}")
            gi["computeInstances"].remove(ci)

    def mig_devices(self, h: int) -> list[MigDeviceInfo]:
        g = self._mig_gpu(h)
        st = self._read()["gpus"][g.uuid]
        out = []
        for gi in sorted(st["gpuInstances"], key=lambda x: x["id"]):
            spec = g.model.profile_by_id(gi["profileId"])
            assert spec is not None
            for ci in gi["computeInstances"]:
                out.append(MigDeviceInfo(
                    uuid=fake_mig_uuid(g.uuid, gi["id"], ci["id"], gi["start"]), gpu_instance_id=gi["id"],
                    compute_instance_id=ci["id"], profile_id=spec.id, profile_name=spec.name,
                    placement=Placement(gi["start"], gi["size"]), memory_mib=spec.memory_mib,
                    multiprocessors=spec.multiprocessors * ci["slices"] // spec.compute_slices))
        return out

    # -- usage (issue 14) ---------------------------------------------------------------------------
    # Load per process comes from the usage file (:data:`USAGE_FILE` in the state directory, or memory without
    # one), which the sandbox and tests write (:meth:`set_process_load`) to inject low or high load:
    #   {"processes": {"<pid>": {"device": "<GPU-... or MIG-... UUID>", "smUtil": 0..100,
    #                            "memUtil": 0..100 (default smUtil/2), "memoryUsedBytes": N}}}
    # The model: a GPU's utilization is the sum of its processes' smUtil (at most 100), its used memory the
    # sum of its and its MIG devices' processes' memory. Refusals as NVML's: utilization and per-process
    # utilization are NOT_SUPPORTED on MIG device handles and on GPUs in MIG mode; a MIG instance's utilization
    # comes only from GPM (Hopper and newer; NOT_SUPPORTED on Ampere), None on its first sample. Processes of a
    # MIG device that no longer exists are not reported. Loaded processes are reported by the usage calls only:
    # they do not block MIG changes (processes added with add_process do).

    def _usage(self) -> dict[str, dict[str, Any]]:
        """Profile loads (pid PROFILE_LOAD_PID + slot), then the usage file's processes (which override them)."""
        base: dict[str, dict[str, Any]] = {}
        for g, load in zip(self._gpus, self._profile.node(self._node_name).loads()):
            if load is not None:
                base[str(PROFILE_LOAD_PID + g.slot)] = {"device": g.uuid, "smUtil": load.sm_util,
                                                        "memoryUsedBytes": load.memory_used_mib * 1024 * 1024}
        return {**base, **self._usage_file()}

    def _usage_file(self) -> dict[str, dict[str, Any]]:
        if self._state_dir is None:
            return self.__dict__.setdefault("_usage_mem", {})
        path = self._state_dir / USAGE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise errors.NvmlError(f"fake NVML usage file {path} is unreadable ({e}); fix or delete it") from None
        procs = raw.get("processes") if isinstance(raw, dict) else None
        if not isinstance(procs, dict):
            raise errors.NvmlError(f"fake NVML usage file {path}: expected {{\"processes\": {{\"<pid>\": {{...}}}}}}")
        for pid, p in procs.items():
            problem = _load_problem(pid, p)
            if problem:
                raise errors.NvmlError(f"fake NVML usage file {path}: processes[{pid!r}]: {problem}")
            p.setdefault("smUtil", 0)
            p.setdefault("memoryUsedBytes", 0)
        return procs

    def _write_usage(self, procs: dict[str, dict[str, Any]]) -> None:
        if self._state_dir is None:
            self.__dict__["_usage_mem"] = procs
            return
        path = self._state_dir / USAGE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"processes": procs}, sort_keys=True))
        os.replace(tmp, path)

    def _mig_of(self, st: dict[str, Any], g: _Gpu) -> dict[str, tuple[int, int]]:
        """MIG UUID -> (GPU instance, compute instance) of the MIG devices that exist now"""
        if not st["migCurrent"]:
            return {}
        return {fake_mig_uuid(g.uuid, gi["id"], ci["id"], gi["start"]): (gi["id"], ci["id"])
                for gi in st["gpuInstances"] for ci in gi["computeInstances"]}

    def _loads_on(self, g: _Gpu, only: str | None = None) -> list[tuple[int, dict[str, Any], int | None, int | None]]:
        """(pid, load, GPU instance, compute instance) of the processes on a GPU (and its MIG devices), or
        on the one device ``only`` (a GPU or MIG UUID)"""
        st = self._read()["gpus"][g.uuid]
        migs = self._mig_of(st, g)
        out = []
        for pid, p in sorted(self._usage().items(), key=lambda kv: int(kv[0])):
            dev = p["device"]
            if only is not None and dev != only:
                continue
            if dev == g.uuid and not st["migCurrent"]:
                out.append((int(pid), p, None, None))
            elif dev in migs:
                out.append((int(pid), p, *migs[dev]))
        return out

    def _mig_handle_of(self, h: Any) -> tuple[_Gpu, str, int, int] | None:
        if not isinstance(h, _MigHandle):
            return None
        self._check_init()
        g = self._gpus[h.slot]
        migs = self._mig_of(self._read()["gpus"][g.uuid], g)
        if h.uuid not in migs:
            raise errors.NotFoundError(f"MIG device {h.uuid} no longer exists on GPU {g.uuid}")
        return g, h.uuid, *migs[h.uuid]

    def utilization_rates(self, h: Any) -> Utilization:
        if self._mig_handle_of(h) is not None:
            raise errors.NotSupportedError(f"nvmlDeviceGetUtilizationRates is not supported on MIG device {h.uuid}")
        g = self._gpu(h)
        if self._read()["gpus"][g.uuid]["migCurrent"]:
            raise errors.NotSupportedError(f"GPU {g.uuid} is in MIG mode: nvmlDeviceGetUtilizationRates is not "
                                           "supported")
        loads = self._loads_on(g)
        return Utilization(gpu=min(100, sum(p["smUtil"] for _, p, _, _ in loads)),
                           memory=min(100, sum(_mem_util(p) for _, p, _, _ in loads)))

    def memory_info(self, h: Any) -> MemoryInfo:
        mig = self._mig_handle_of(h)
        if mig is not None:
            g, uuid, gi, _ = mig
            spec = g.model.profile_by_id(next(x["profileId"] for x in self._read()["gpus"][g.uuid]["gpuInstances"]
                                              if x["id"] == gi))
            assert spec is not None
            total = spec.memory_mib * 1024 * 1024
            used = sum(p["memoryUsedBytes"] for _, p, _, _ in self._loads_on(g, uuid))
        else:
            g = self._gpu(h)
            total = g.info.memory_total_bytes
            used = sum(p["memoryUsedBytes"] for _, p, _, _ in self._loads_on(g))
        return MemoryInfo(total=total, used=used, free=max(0, total - used))

    def compute_processes(self, h: Any) -> list[ProcessInfo]:
        mig = self._mig_handle_of(h)
        if mig is not None:
            g, uuid, gi, ci = mig
            loads = self._loads_on(g, uuid)
            st = self._read()["gpus"][g.uuid]
            plain = [pid for x in st["gpuInstances"] if x["id"] == gi for c in x["computeInstances"]
                     if c["id"] == ci for pid in c["processes"]]
            extra = [(pid, gi, ci) for pid in plain]
        else:
            g = self._gpu(h)
            loads = self._loads_on(g)
            st = self._read()["gpus"][g.uuid]
            extra = [(pid, None, None) for pid in st["processes"]] + [
                (pid, x["id"], c["id"]) for x in st["gpuInstances"] for c in x["computeInstances"]
                for pid in c["processes"]]
        out = {pid: ProcessInfo(pid, p["memoryUsedBytes"], gi, ci) for pid, p, gi, ci in loads}
        for pid, gi, ci in extra:
            out.setdefault(pid, ProcessInfo(pid, 0, gi, ci))
        return [out[pid] for pid in sorted(out)]

    def process_utilization(self, h: Any, since_us: int = 0) -> list[ProcessUtilization]:
        if self._mig_handle_of(h) is not None:
            raise errors.NotSupportedError(f"nvmlDeviceGetProcessUtilization is not supported on MIG device {h.uuid}")
        g = self._gpu(h)
        if self._read()["gpus"][g.uuid]["migCurrent"]:
            raise errors.NotSupportedError(f"GPU {g.uuid} is in MIG mode: nvmlDeviceGetProcessUtilization is not "
                                           "supported")
        now = int(time.time() * 1_000_000)
        if since_us >= now:
            return []
        return [ProcessUtilization(pid, now, p["smUtil"], _mem_util(p)) for pid, p, _, _ in self._loads_on(g)]

    def mig_device_handle(self, mig_uuid: str) -> Any:
        self._check_init()
        for g in self._gpus:
            if g.model.mig is not None and mig_uuid in self._mig_of(self._read()["gpus"][g.uuid], g):
                return _MigHandle(g.slot, mig_uuid)
        raise errors.NotFoundError(f"no MIG device with UUID {mig_uuid} on node {self._node_name}")

    def mig_utilization(self, h: Any, gpu_instance_id: int) -> float | None:
        g = self._mig_gpu(h)
        if g.model.architecture not in MIG_MODE_WITHOUT_RESET:      # GPM: Hopper and newer
            raise errors.NotSupportedError(f"GPU {g.uuid} ({g.model.product_name}) does not support GPU "
                                           "Performance Monitoring, which is how NVML reports a MIG instance's "
                                           "utilization")
        st = self._read()["gpus"][g.uuid]
        if not st["migCurrent"]:
            raise errors.NotSupportedError(f"GPU {g.uuid} is not in MIG mode")
        self._gi(st, g, gpu_instance_id)
        seen = self.__dict__.setdefault("_gpm_seen", set())
        if (g.slot, gpu_instance_id) not in seen:
            seen.add((g.slot, gpu_instance_id))
            return None
        return float(min(100, sum(p["smUtil"] for _, p, gi, _ in self._loads_on(g) if gi == gpu_instance_id)))

    def set_process_load(self, device_uuid: str, pid: int, sm_util: int, memory_used_bytes: int = 0,
                         mem_util: int | None = None) -> None:
        """Run (or change) a process with this load on a GPU or MIG device (test and sandbox hook)."""
        self._check_init()
        load = {"device": device_uuid, "smUtil": sm_util, "memoryUsedBytes": memory_used_bytes}
        if mem_util is not None:
            load["memUtil"] = mem_util
        problem = _load_problem(str(pid), load)
        if problem:
            raise errors.InvalidArgumentError(f"process {pid}: {problem}")
        if device_uuid in self._by_uuid:
            g = self._by_uuid[device_uuid]
            total = g.info.memory_total_bytes
        else:
            g, uuid, gi, _ = self._mig_handle_of(self.mig_device_handle(device_uuid))  # type: ignore[misc]
            spec = g.model.profile_by_id(next(x["profileId"] for x in self._read()["gpus"][g.uuid]["gpuInstances"]
                                              if x["id"] == gi))
            assert spec is not None
            total = spec.memory_mib * 1024 * 1024
        others = sum(p["memoryUsedBytes"] for q, p in self._usage().items() if p["device"] == device_uuid
                     and q != str(pid))
        procs = dict(self._usage_file())
        if others + memory_used_bytes > total:
            raise errors.InsufficientResourcesError(f"process {pid}: {memory_used_bytes} bytes do not fit device "
                                                    f"{device_uuid} ({total - others} of {total} bytes free)")
        procs[str(pid)] = load
        self._write_usage(procs)

    def clear_process_load(self, pid: int) -> None:
        """Stop an injected process (a profile load stays: set its load to 0 instead)."""
        procs = dict(self._usage_file())
        if procs.pop(str(pid), None) is not None:
            self._write_usage(procs)

    # -- test hooks (not part of the NVML interface) ---------------------------------------------
    def add_process(self, device_uuid: str, pid: int) -> None:
        """Start a fake compute process on a GPU (GPU UUID) or on a MIG device (MIG UUID)."""
        self._set_process(device_uuid, pid, add=True)

    def remove_process(self, device_uuid: str, pid: int) -> None:
        self._set_process(device_uuid, pid, add=False)

    def _set_process(self, device_uuid: str, pid: int, add: bool) -> None:
        with self._mutate() as state:
            for g in self._gpus:
                st = state["gpus"][g.uuid]
                if device_uuid == g.uuid:
                    target = st["processes"]
                    break
                for gi in st["gpuInstances"]:
                    for ci in gi["computeInstances"]:
                        if fake_mig_uuid(g.uuid, gi["id"], ci["id"], gi["start"]) == device_uuid:
                            target = ci["processes"]
                            break
                    else:
                        continue
                    break
                else:
                    continue
                break
            else:
                raise errors.NotFoundError(f"no GPU or MIG device with UUID {device_uuid}")
            if add and pid not in target:
                target.append(pid)
            elif not add and pid in target:
                target.remove(pid)

    def set_healthy(self, gpu_uuid: str, healthy: bool) -> None:
        if gpu_uuid not in self._by_uuid:
            raise errors.NotFoundError(f"no GPU with UUID {gpu_uuid}")
        with self._mutate() as state:
            state["gpus"][gpu_uuid]["healthy"] = healthy

    # -- health events and checks (issue 13; docs/health.md "Fake GPUs") ---------------------------
    # Injected events change the GPU's state as the hardware event would (persisted like the rest of the
    # state) and are delivered to every event set registered for the GPU and the event type, as NVML
    # delivers them. Injections come from the profile (nodes[].healthEvents, once the first event set is
    # registered in this process), from inject() and from the events file (JSON lines), which
    # event_set_wait follows; its read position is kept in the state, so a restarted plugin goes on
    # where it stopped. A line that cannot be applied is logged with its line number and skipped.
    def _health_init(self) -> None:
        if getattr(self, "_event_sets", None) is None:
            self._event_sets: dict[int, dict[str, Any]] = {}
            self._next_event_set = 1
            self._profile_events_sent = False
            self.injection_errors: list[str] = []

    def set_events_file(self, path: str | Path | None) -> None:
        self._health_init()
        self._events_file = Path(path) if path is not None else None

    def event_set_create(self) -> int:
        self._check_init()
        self._health_init()
        es = self._next_event_set
        self._next_event_set += 1
        self._event_sets[es] = {"types": {}, "queue": collections.deque()}
        return es

    def _event_set(self, es: Any) -> dict[str, Any]:
        self._health_init()
        if es not in self._event_sets:
            raise errors.InvalidArgumentError(f"invalid or freed event set {es!r}")
        return self._event_sets[es]

    def register_events(self, event_set: Any, h: int, event_types: int) -> None:
        g = self._gpu(h)
        s = self._event_set(event_set)
        supported = EVENT_TYPE_XID_CRITICAL | EVENT_TYPE_DOUBLE_BIT_ECC | EVENT_TYPE_SINGLE_BIT_ECC | \
            EVENT_TYPE_PSTATE | EVENT_TYPE_CLOCK
        if event_types & ~supported:
            raise errors.NotSupportedError(f"GPU {g.uuid} does not support event types 0x{event_types & ~supported:x}")
        s["types"][g.uuid] = s["types"].get(g.uuid, 0) | event_types

    def _send_profile_events(self) -> None:
        if self._profile_events_sent:
            return
        self._profile_events_sent = True
        for i, inj in enumerate(self._profile.node(self._node_name).health_events):
            try:
                self.inject(inj)
            except InjectionError as e:
                self._injection_failed(f"fake GPU profile, node {self._node_name}, healthEvents[{i}]: {e}")

    def event_set_free(self, event_set: Any) -> None:
        self._event_set(event_set)
        del self._event_sets[event_set]

    def event_set_wait(self, event_set: Any, timeout_ms: int) -> HealthEvent | None:
        self._check_init()
        s = self._event_set(event_set)
        deadline = time.monotonic() + max(0, timeout_ms) / 1000
        if s["types"]:
            self._send_profile_events()        # once something is registered, as at the start of a node
        while True:
            self._follow_events_file()
            if s["queue"]:
                return s["queue"].popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(left, _EVENTS_POLL_SECONDS))

    def health_check(self, h: int) -> HealthCheck:
        g = self._gpu(h)       # GpuLostError for a GPU that fell off the bus
        h_st = self._read()["gpus"][g.uuid].get("health") or {}
        return HealthCheck(retired_pages_pending=bool(h_st.get("retiredPagesPending")),
                           remapped_rows_pending=bool(h_st.get("remappedRowsPending")),
                           remapped_rows_failure=bool(h_st.get("remappedRowsFailure")),
                           recovery_action=int(h_st.get("recoveryAction") or RECOVERY_ACTION_NONE))

    # injection (test hooks and the events file; not part of the NVML interface)
    def inject(self, event: HealthInjection | dict | str) -> HealthEvent | None:
        """Apply one health event as the hardware would; the NVML event it raises (None for conditions
        only the periodic check sees). InjectionError for an unknown kind or device; nothing changes then."""
        self._check_init()
        self._health_init()
        inj = event if isinstance(event, HealthInjection) else parse_injection(event)
        g, gi, ci = self._injection_target(inj)
        nvml_event: HealthEvent | None = None
        if inj.kind == "xid" and inj.xid != XID_FALLEN_OFF_BUS:
            # an XID changes nothing the driver keeps: no state write, so a flood costs reads only
            if not self._read()["gpus"][g.uuid]["healthy"]:
                raise InjectionError(f"GPU {g.uuid} has fallen off the bus; it reports nothing until a reset "
                                     '(inject {"kind": "reset"})')
            self._deliver(g, HealthEvent(g.uuid, EVENT_XID, int(inj.xid or 0), gi, ci))
            return HealthEvent(g.uuid, EVENT_XID, int(inj.xid or 0), gi, ci)
        with self._mutate() as state:
            st = state["gpus"][g.uuid]
            health = st.setdefault("health", {})
            if inj.kind == "reset":
                if st["healthy"] and self._all_processes(st):
                    raise InjectionError(f"reset of GPU {g.uuid} refused (NVML: In use): processes "
                                         f"{sorted(self._all_processes(st))} run on it; stop them first")
                st["healthy"] = True
                for k in ("retiredPagesPending", "remappedRowsPending", "recoveryAction"):
                    health.pop(k, None)
            elif not st["healthy"]:
                raise InjectionError(f"GPU {g.uuid} has fallen off the bus; it reports nothing until a reset "
                                     '(inject {"kind": "reset"})')
            elif inj.kind == "fallen_off_bus" or (inj.kind == "xid" and inj.xid == XID_FALLEN_OFF_BUS):
                st["healthy"] = False
                nvml_event = HealthEvent(g.uuid, EVENT_XID, XID_FALLEN_OFF_BUS)
            elif inj.kind == "ecc_dbe":
                # the DBE's page is retired (before Ampere) or its row remapped (Ampere and later) at the next reset
                key = "remappedRowsPending" if g.model.architecture not in _RETIRED_PAGES_ARCHITECTURES \
                    else "retiredPagesPending"
                health[key] = True
                nvml_event = HealthEvent(g.uuid, EVENT_ECC_DBE, XID_DBE, gi, ci)
            elif inj.kind == "recovery_action":
                health["recoveryAction"] = RECOVERY_ACTION_NAMES.index(inj.action)
            else:
                key = {"retired_pages_pending": "retiredPagesPending", "remapped_rows_pending": "remappedRowsPending",
                       "remapped_rows_failure": "remappedRowsFailure"}[inj.kind]
                health[key] = inj.value
        if nvml_event is not None:
            self._deliver(g, nvml_event)
        return nvml_event

    def _deliver(self, g: _Gpu, event: HealthEvent) -> None:
        bit = EVENT_TYPE_XID_CRITICAL if event.kind == EVENT_XID else EVENT_TYPE_DOUBLE_BIT_ECC
        for s in self._event_sets.values():
            if s["types"].get(g.uuid, 0) & bit:
                if len(s["queue"]) >= _MAX_QUEUED_EVENTS:
                    s["queue"].popleft()           # NVML's event buffer is bounded too: the oldest is dropped
                s["queue"].append(event)

    def _injection_target(self, inj: HealthInjection) -> tuple[_Gpu, int | None, int | None]:
        if inj.mig is not None:
            for g in self._gpus:
                st = self._read()["gpus"][g.uuid]
                for gi in st["gpuInstances"]:
                    for ci in gi["computeInstances"]:
                        if fake_mig_uuid(g.uuid, gi["id"], ci["id"], gi["start"]) == inj.mig:
                            if inj.gpu is not None and self._gpu_of(inj.gpu, inj) is not g:
                                raise InjectionError(f"{inj.kind} event: MIG device {inj.mig} is not on GPU {inj.gpu}")
                            return g, gi["id"], ci["id"]
            raise InjectionError(f"{inj.kind} event: no MIG device {inj.mig} on node {self._node_name}; "
                                 "list them with `partita inventory`")
        g = self._gpu_of(inj.gpu, inj)
        if inj.gpu_instance is None:
            return g, None, None
        st = self._read()["gpus"][g.uuid]
        gi = next((x for x in st["gpuInstances"] if x["id"] == inj.gpu_instance), None)
        if gi is None:
            raise InjectionError(f"{inj.kind} event: GPU {g.uuid} has no GPU instance {inj.gpu_instance} "
                                 f"(it has {sorted(x['id'] for x in st['gpuInstances']) or 'none'})")
        ci = inj.compute_instance
        if ci is None:
            ci = gi["computeInstances"][0]["id"] if gi["computeInstances"] else None
        elif not any(c["id"] == ci for c in gi["computeInstances"]):
            raise InjectionError(f"{inj.kind} event: GPU instance {gi['id']} on GPU {g.uuid} has no compute "
                                 f"instance {ci}")
        return g, gi["id"], ci

    def _gpu_of(self, ref: int | str | None, inj: HealthInjection) -> _Gpu:
        if isinstance(ref, int) and not isinstance(ref, bool):
            if 0 <= ref < len(self._gpus):
                return self._gpus[ref]
            raise InjectionError(f"{inj.kind} event: node {self._node_name} has no GPU {ref} (GPUs 0.."
                                 f"{len(self._gpus) - 1})")
        if isinstance(ref, str) and ref in self._by_uuid:
            return self._by_uuid[ref]
        if isinstance(ref, str) and ref.isdigit():
            return self._gpu_of(int(ref), inj)
        raise InjectionError(f"{inj.kind} event: node {self._node_name} has no GPU {ref!r}; give its index "
                             f"(0..{len(self._gpus) - 1}) or UUID")

    def _injection_failed(self, message: str) -> None:
        self.injection_errors.append(message)
        del self.injection_errors[:-100]
        _log.warning("fake NVML: %s", message)

    def _follow_events_file(self) -> None:
        path = getattr(self, "_events_file", None)
        if path is None:
            return
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        key = str(path)
        state = self._read()
        offset = int((state.get("eventsRead") or {}).get(key, 0))
        lines_before = int((state.get("eventsLines") or {}).get(key, 0))
        if size == offset:
            return
        if size < offset:
            offset, lines_before = 0, 0         # the file was truncated or replaced: read it from the start
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(_MAX_EVENTS_READ)
        end = data.rfind(b"\n")
        if end < 0:
            return                              # a line still being written
        lines = data[:end + 1].split(b"\n")[:-1]
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            where = f"{path} line {lines_before + i + 1}"
            try:
                self.inject(parse_injection(raw.decode("utf-8", "replace"), where))
            except InjectionError as e:
                self._injection_failed(str(e) if str(e).startswith(where) else f"{where}: {e}")
        with self._mutate() as st:
            st.setdefault("eventsRead", {})[key] = offset + end + 1
            st.setdefault("eventsLines", {})[key] = lines_before + len(lines)
