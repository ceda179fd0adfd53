"""Which published device a name refers to: the inverse of the slice builder's naming."""

from __future__ import annotations

from dataclasses import dataclass

from driver.api import constants as C
from driver.api import naming
from driver.inventory import Gpu, Inventory, MigDevice, MigProfile


@dataclass(frozen=True)
class DeviceRef:
    name: str
    type: str                         # gpu | mig | shared
    gpu: Gpu
    profile: MigProfile | None = None  # mig: the GPU-instance profile
    placement_start: int | None = None
    static_mig: MigDevice | None = None  # mig devices that exist independently of Partita (static MIG)


def device_index(inv: Inventory) -> dict[str, DeviceRef]:
    """Every device name this node can publish (all feature combinations) -> what it is."""
    out: dict[str, DeviceRef] = {}
    for gpu in inv.gpus:
        name = naming.gpu_device_name(gpu.uuid)
        out[name] = DeviceRef(name, C.DEVICE_TYPE_GPU, gpu)
        shared = naming.shared_device_name(name)
        out[shared] = DeviceRef(shared, C.DEVICE_TYPE_SHARED, gpu)
        for p in gpu.mig_profiles:
            for pl in p.placements:
                n = naming.mig_device_name(name, p.name, pl.start)
                out[n] = DeviceRef(n, C.DEVICE_TYPE_MIG, gpu, p, pl.start)
        profiles = {p.profile_id: p for p in gpu.mig_profiles}
        for d in gpu.mig_devices:
            n = naming.mig_device_name(name, d.profile_name, d.placement.start)
            out[n] = DeviceRef(n, C.DEVICE_TYPE_MIG, gpu, profiles.get(d.profile_id), d.placement.start, d)
    return out
