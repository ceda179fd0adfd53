"""Inventory -> ResourceSlices: Partita's published device model (docs/architecture.md §3, docs/device-model.md).

Pure functions. One pool per node (named after it). Per physical GPU, depending on what the cluster
supports (:class:`SliceFeatures`):

* partitionable devices on: a counter set per GPU (``memory-slice-<i>`` 0/1 counters on MIG GPUs plus
  aggregate counters: memory, multiprocessors, compute slices, engines); the whole GPU consumes all of
  them; each MIG (profile, placement) is a device consuming its memory slices and aggregates, so whole,
  MIG and shared use of a GPU exclude each other exactly where the hardware does;
* consumable capacity on (and partitionable on): a shared device, ``allowMultipleAllocations``, memory
  capacity with a request policy, consuming every counter (the allocator charges a multi-allocatable
  device's counters on its first share);
* partitionable off: static MIG — existing MIG devices of MIG-enabled GPUs, which are then not offered
  whole; no shared device (nothing would keep it apart from the whole GPU);
* taints on (controller mode): every device carries Partita's NoSchedule taint;
* health (docs/health.md): a device of an unhealthy GPU or MIG instance carries the health taint
  ``gpu.partita.dev/unhealthy=<state>`` (MIG and shared devices of an unhealthy GPU too); where the API
  server drops device taints (``health_taints`` off), devices whose health taint keeps allocations away are
  left out instead.

Ampere GPUs cannot change MIG mode without a reset, so a MIG-enabled A100 offers only its MIG devices
and a MIG-disabled one only whole/shared use; Hopper and newer offer everything.

Every output slice is valid for resource.k8s.io/v1 and within every upstream limit (driver/limits.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from driver.api import constants as C
from driver.api import naming
from driver.api.quantity import format_bytes
from driver.inventory import Gpu, Inventory, MigDevice, MigProfile
from driver.nvml.interface import MIG_MODE_WITHOUT_RESET
from driver.limits import MAX_COUNTER_SETS, MAX_DEVICES, MAX_DEVICES_WITH_ADVANCED_FEATURES

_GIB = 1024**3


@dataclass(frozen=True)
class SliceFeatures:
    """What the API server keeps (detected by the publisher) and the install's allocation mode."""

    taints: bool = True                 # controller mode: devices carry the managed taint
    partitionable: bool = True          # sharedCounters / consumesCounters survive
    consumable_capacity: bool = True    # allowMultipleAllocations / requestPolicy survive
    health_taints: bool = True          # device taints survive (else unhealthy devices are left out)

    @property
    def allocation_mode(self) -> str:
        return C.ALLOCATION_MODE_CONTROLLER if self.taints else C.ALLOCATION_MODE_SCHEDULER

    def without(self, **off: bool) -> "SliceFeatures":
        return replace(self, **{k: False for k, v in off.items() if v})


# -- attribute helpers ------------------------------------------------------------------------------
def semver(text: str) -> str:
    """NVML versions as semver: ``580.105.08`` -> ``580.105.8``, ``9.0`` -> ``9.0.0``."""
    parts = [p for p in text.strip().split(".") if p != ""]
    nums = []
    for p in parts[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        nums.append(str(int(digits)) if digits else "0")
    while len(nums) < 3:
        nums.append("0")
    return ".".join(nums)


def _s(v: str) -> dict:
    return {"string": v}


def _parent_attributes(inv: Inventory, gpu: Gpu) -> dict:
    attrs = {
        C.ATTR_PRODUCT_NAME: _s(gpu.product_name),
        C.ATTR_BRAND: _s(gpu.brand),
        C.ATTR_ARCHITECTURE: _s(gpu.architecture),
        C.ATTR_CUDA_COMPUTE_CAPABILITY: {"version": semver(gpu.cuda_compute_capability)},
        C.ATTR_DRIVER_VERSION: {"version": semver(inv.driver_version)},
        C.ATTR_CUDA_DRIVER_VERSION: {"version": semver(inv.cuda_driver_version)},
        C.ATTR_PCI_BUS_ID: _s(gpu.pci_bus_id),
    }
    if gpu.pcie_root:
        attrs[C.ATTR_PCIE_ROOT] = _s(gpu.pcie_root)
    if gpu.numa_node is not None:
        attrs[C.ATTR_NUMA_NODE] = {"int": gpu.numa_node}
    return attrs


def _nvlink_attributes(gpu: Gpu) -> dict:
    """NVLink topology, on devices that can use NVLink: whole GPUs and shares of one (MIG devices have
    no GPU-to-GPU peer access, so they do not carry it)."""
    attrs: dict = {}
    if gpu.fabric_clique:
        attrs[C.ATTR_FABRIC_CLIQUE] = _s(gpu.fabric_clique)
    if gpu.nvlink_domain:
        attrs[C.ATTR_NVLINK_DOMAIN] = _s(gpu.nvlink_domain)
        attrs[C.ATTR_NVLINK_PEERS] = {"int": len(gpu.nvlink_peers)}
    return attrs


def shared_memory_policy(gpu: Gpu) -> dict:
    """Request policy of a shared GPU's memory: 1Gi steps from 1Gi; an unsized request gets 1/8 of the
    GPU (one MIG memory slice's worth, 10Gi on an 80GB board), so unsized notebooks still pack 8 a GPU."""
    default = max(1, gpu.memory_bytes // 8 // _GIB)
    return {"default": f"{default}Gi", "validRange": {"min": "1Gi", "step": "1Gi"}}


def _engine_totals(gpu: Gpu) -> dict[str, int]:
    """Counter-set totals for engines: the most any one profile uses (its whole-GPU figure)."""
    return {
        "copy-engines": max(p.copy_engines for p in gpu.mig_profiles),
        "decoders": max(p.decoders for p in gpu.mig_profiles),
        "encoders": max(p.encoders for p in gpu.mig_profiles),
        "jpeg-engines": max(p.jpeg_engines for p in gpu.mig_profiles),
        "ofa-engines": max(p.ofa_engines for p in gpu.mig_profiles),
    }


def _compute_slices(gpu: Gpu) -> int:
    return max(p.compute_slices for p in gpu.mig_profiles)


def gpu_counters(gpu: Gpu, dynamic_mig: bool) -> dict[str, int]:
    """Counter name -> total for a GPU's counter set."""
    counters = {"memory": gpu.memory_bytes, "multiprocessors": gpu.multiprocessors}
    if dynamic_mig:
        counters["compute-slices"] = _compute_slices(gpu)
        counters.update(_engine_totals(gpu))
        for i in range(gpu.memory_slices):
            counters[f"memory-slice-{i}"] = 1
    return counters


def mig_counters(profile: MigProfile, start: int) -> dict[str, int]:
    counters = {
        "memory": profile.memory_mib * 1024 * 1024,
        "multiprocessors": profile.multiprocessors,
        "compute-slices": profile.compute_slices,
        "copy-engines": profile.copy_engines,
        "decoders": profile.decoders,
        "encoders": profile.encoders,
        "jpeg-engines": profile.jpeg_engines,
        "ofa-engines": profile.ofa_engines,
    }
    for i in range(start, start + profile.memory_slices):
        counters[f"memory-slice-{i}"] = 1
    return counters


def _counter_values(counters: dict[str, int]) -> dict:
    return {k: {"value": format_bytes(v) if k == "memory" else str(v)} for k, v in counters.items() if v or k.startswith("memory-slice")}


def _consumes(gpu_name: str, counters: dict[str, int]) -> list[dict]:
    return [{"counterSet": naming.counter_set_name(gpu_name), "counters": _counter_values(counters)}]


def _mig_capacity(memory_mib: int, profile: MigProfile | None, multiprocessors: int) -> dict:
    cap = {C.CAP_MEMORY: {"value": format_bytes(memory_mib * 1024 * 1024)},
           C.CAP_MULTIPROCESSORS: {"value": str(multiprocessors)}}
    if profile is not None:
        for key, val in (("copyEngines", profile.copy_engines), ("decoders", profile.decoders),
                         ("encoders", profile.encoders), ("jpegEngines", profile.jpeg_engines),
                         ("ofaEngines", profile.ofa_engines)):
            cap[key] = {"value": str(val)}
    return cap


# -- health ----------------------------------------------------------------------------------------
_EFFECT_RANK = {"None": 0, "NoSchedule": 1, "NoExecute": 2}


@dataclass(frozen=True)
class HealthTaint:
    state: str                          # degraded | fatal | lost
    effect: str                         # NoSchedule | NoExecute | None
    time_added: str                     # RFC 3339: when the device entered the state


@dataclass(frozen=True)
class HealthTaints:
    """Unhealthy GPUs (by UUID: every device of the GPU) and MIG devices (by device name)."""

    gpus: Mapping[str, HealthTaint] = field(default_factory=dict)
    devices: Mapping[str, HealthTaint] = field(default_factory=dict)

    def for_device(self, gpu_uuid: str, name: str) -> HealthTaint | None:
        g, d = self.gpus.get(gpu_uuid), self.devices.get(name)
        if g is None or d is None:
            return g or d
        return d if _EFFECT_RANK.get(d.effect, 0) > _EFFECT_RANK.get(g.effect, 0) else g


NO_HEALTH_TAINTS = HealthTaints()


def _apply_health(gpu: Gpu, devices: list[dict], health: HealthTaints, features: SliceFeatures) -> list[dict]:
    out = []
    for d in devices:
        t = health.for_device(gpu.uuid, d["name"])
        if t is None:
            out.append(d)
        elif features.health_taints:
            d["taints"] = list(d.get("taints") or []) + [C.health_taint(t.state, t.effect, t.time_added)]
            out.append(d)
        elif t.effect not in ("NoSchedule", "NoExecute"):
            out.append(d)                     # informational only: nothing to keep away
    return out


# -- devices per GPU -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuDevices:
    gpu: Gpu
    counter_set: dict | None
    devices: tuple[dict, ...]


def dynamic_mig_available(gpu: Gpu) -> bool:
    """MIG partitions can be created on demand: Hopper and newer always; Ampere only when MIG is on."""
    if not gpu.mig_capable or not gpu.mig_profiles:
        return False
    return gpu.architecture in MIG_MODE_WITHOUT_RESET or gpu.mig_enabled


def whole_gpu_usable(gpu: Gpu) -> bool:
    """The GPU can serve as a whole (or shared) GPU: not stuck in MIG mode."""
    return not gpu.mig_enabled or gpu.architecture in MIG_MODE_WITHOUT_RESET


def gpu_devices(inv: Inventory, gpu: Gpu, features: SliceFeatures,
                health: HealthTaints = NO_HEALTH_TAINTS) -> GpuDevices:
    name = naming.gpu_device_name(gpu.uuid)
    parent = _parent_attributes(inv, gpu)
    devices: list[dict] = []
    counter_set = None
    if features.partitionable:
        dynamic = dynamic_mig_available(gpu)
        totals = gpu_counters(gpu, dynamic)
        counter_set = {"name": naming.counter_set_name(name), "counters": _counter_values(totals)}
        if whole_gpu_usable(gpu):
            devices.append(_whole(gpu, name, parent, _consumes(name, totals)))
        if dynamic:
            for profile in gpu.mig_profiles:
                for pl in profile.placements:
                    devices.append({
                        "name": naming.mig_device_name(name, profile.name, pl.start),
                        "attributes": {
                            C.ATTR_TYPE: _s(C.DEVICE_TYPE_MIG), C.ATTR_MIG_PROFILE: _s(profile.name),
                            C.ATTR_MIG_PLACEMENT: {"int": pl.start}, C.ATTR_PARENT_UUID: _s(gpu.uuid), **parent},
                        "capacity": _mig_capacity(profile.memory_mib, profile, profile.multiprocessors),
                        "consumesCounters": _consumes(name, mig_counters(profile, pl.start)),
                    })
        if features.consumable_capacity and whole_gpu_usable(gpu):
            devices.append({
                "name": naming.shared_device_name(name),
                "allowMultipleAllocations": True,
                "attributes": {C.ATTR_TYPE: _s(C.DEVICE_TYPE_SHARED), C.ATTR_PARENT_UUID: _s(gpu.uuid), **parent,
                               **_nvlink_attributes(gpu)},
                "capacity": {C.CAP_MEMORY: {"value": format_bytes(gpu.memory_bytes),
                                            "requestPolicy": shared_memory_policy(gpu)}},
                "consumesCounters": _consumes(name, totals),
            })
    elif gpu.mig_enabled:
        profiles = {p.profile_id: p for p in gpu.mig_profiles}
        for d in gpu.mig_devices:
            devices.append(_static_mig(name, parent, gpu, d, profiles.get(d.profile_id)))
    else:
        devices.append(_whole(gpu, name, parent, None))
    if features.taints:
        for d in devices:
            d["taints"] = [C.managed_taint()]
    devices = _apply_health(gpu, devices, health, features)
    return GpuDevices(gpu, counter_set, tuple(devices))


def _whole(gpu: Gpu, name: str, parent: dict, consumes: list[dict] | None) -> dict:
    d = {
        "name": name,
        "attributes": {C.ATTR_TYPE: _s(C.DEVICE_TYPE_GPU), C.ATTR_UUID: _s(gpu.uuid),
                       C.ATTR_MIG_CAPABLE: {"bool": gpu.mig_capable}, **parent, **_nvlink_attributes(gpu)},
        "capacity": {C.CAP_MEMORY: {"value": format_bytes(gpu.memory_bytes)},
                     C.CAP_MULTIPROCESSORS: {"value": str(gpu.multiprocessors)}},
    }
    if consumes:
        d["consumesCounters"] = consumes
    return d


def _static_mig(gpu_name: str, parent: dict, gpu: Gpu, d: MigDevice, profile: MigProfile | None) -> dict:
    return {
        "name": naming.mig_device_name(gpu_name, d.profile_name, d.placement.start),
        "attributes": {C.ATTR_TYPE: _s(C.DEVICE_TYPE_MIG), C.ATTR_UUID: _s(d.uuid),
                       C.ATTR_MIG_PROFILE: _s(d.profile_name), C.ATTR_MIG_PLACEMENT: {"int": d.placement.start},
                       C.ATTR_PARENT_UUID: _s(gpu.uuid), **parent},
        "capacity": _mig_capacity(d.memory_mib, profile, d.multiprocessors),
    }


# -- slices ----------------------------------------------------------------------------------------
def slice_name(node_name: str, driver_name: str, index: int) -> str:
    """``<node>-<driver>-<index>``; long node names are shortened with a hash so the name stays ≤253."""
    name = f"{node_name}-{driver_name}-{index}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(node_name.encode()).hexdigest()[:10]
    return f"{node_name[:253 - len(driver_name) - 20]}-{digest}-{driver_name}-{index}"


def _chunks(groups: Iterable[tuple[dict, ...]], limit: int) -> list[list[dict]]:
    """Pack per-GPU device groups into slices of at most ``limit`` devices, keeping groups together."""
    out: list[list[dict]] = []
    cur: list[dict] = []
    for g in groups:
        if cur and len(cur) + len(g) > limit:
            out.append(cur)
            cur = []
        if len(g) > limit:  # cannot happen with Partita's device model; split rather than exceed the limit
            for i in range(0, len(g), limit):
                out.append(list(g[i:i + limit]))
            continue
        cur.extend(g)
    if cur:
        out.append(cur)
    return out


def build_slices(inv: Inventory, *, driver_name: str = C.DEFAULT_DRIVER_NAME, node_uid: str = "",
                 features: SliceFeatures = SliceFeatures(), generation: int = 1,
                 health: HealthTaints = NO_HEALTH_TAINTS) -> list[dict]:
    """The complete pool for a node: counter-set slices first, then device slices."""
    per_gpu = [gpu_devices(inv, g, features, health) for g in inv.gpus]
    counter_sets = [g.counter_set for g in per_gpu if g.counter_set is not None]
    groups = [g.devices for g in per_gpu if g.devices]
    advanced = features.taints or any("consumesCounters" in d or "taints" in d for grp in groups for d in grp)
    limit = MAX_DEVICES_WITH_ADVANCED_FEATURES if advanced else MAX_DEVICES
    specs: list[dict] = []
    for i in range(0, len(counter_sets), MAX_COUNTER_SETS):
        specs.append({"sharedCounters": counter_sets[i:i + MAX_COUNTER_SETS]})
    for chunk in _chunks(groups, limit):
        specs.append({"devices": chunk})
    if not specs:
        specs.append({"devices": []})
    node = inv.node_name
    # The owner reference needs the Node's UID; without one (``partita inventory`` off-cluster) it is left
    # out and the publisher fills it in.
    owners = [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid, "controller": True}] if node_uid else []
    slices = []
    for i, extra in enumerate(specs):
        slices.append({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {
                "name": slice_name(node, driver_name, i),
                "labels": {C.SLICE_NODE_LABEL: node if len(node) <= 63 else hashlib.sha256(node.encode()).hexdigest()[:63],
                           C.SLICE_ALLOCATION_MODE_LABEL: features.allocation_mode},
                **({"ownerReferences": owners} if owners else {}),
            },
            "spec": {
                "driver": driver_name,
                "nodeName": node,
                "pool": {"name": node, "generation": generation, "resourceSliceCount": len(specs)},
                **extra,
            },
        })
    return slices


def device_count(slices: Iterable[dict]) -> int:
    return sum(len(s["spec"].get("devices") or []) for s in slices)

