"""One allocated device of a claim, set up on the node (:meth:`DeviceSetup.prepare`), and a prepared claim's
devices checked to still be there (:meth:`DeviceSetup.verify`).

Per device type: whole GPU -> nothing to change (leave MIG mode if a Hopper GPU is still in it); MIG -> the
MIG device at the allocated placement (:mod:`driver.plugin.mig`); shared, or a whole GPU with a sharing
config -> the sharing set-up (:mod:`driver.plugin.sharing`). Admin access (``adminAccess: true``) changes
nothing on the device: no MIG mode change or instance creation (its MIG device must exist), no sharing
set-up. The result is the checkpoint's :class:`PreparedDevice`, with its CDI device IDs (:mod:`driver.plugin.cdi`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Callable

from driver.api import constants as C
from driver.api.config import GpuConfig
from driver.nvml import NvmlBackend
from driver.nvml.interface import COMPUTE_MODE_EXCLUSIVE_PROCESS
from driver.plugin import cdi
from driver.plugin.admission import is_admin
from driver.plugin.checkpoint import Checkpoint, MigInstance, PreparedClaim, PreparedDevice
from driver.plugin.claimref import ClaimRef, PrepareError, base_request
from driver.plugin.devices import DeviceRef
from driver.plugin.mig import MigDevices
from driver.plugin.release import ClaimSpecs
from driver.plugin.sharing import Sharing, holds_share, strategy_of, uses_sharing

log = logging.getLogger(__name__)


class DeviceSetup:
    """``toolkit_dirs``: where the NVIDIA container toolkit's CDI spec is looked for (none: no lookup);
    ``devices``: the node's device index (read at each call: the inventory may change)."""

    def __init__(self, *, driver_name: str, backend: NvmlBackend, mig: MigDevices, sharing: Sharing,
                 specs: ClaimSpecs, toolkit_dirs: Iterable[Path], devices: Callable[[], Mapping[str, DeviceRef]],
                 crash: Callable[[str], None]):
        self.driver_name = driver_name
        self.backend = backend
        self.mig = mig
        self.sharing = sharing
        self.specs = specs
        self.toolkit_dirs = list(toolkit_dirs)
        self._devices = devices
        self._crash = crash

    def prepare(self, cp: Checkpoint, entry: PreparedClaim, ref: ClaimRef, result: dict, dev: DeviceRef,
                config: GpuConfig | None) -> PreparedDevice:
        h = self.backend.device_by_uuid(dev.gpu.uuid)
        mig: MigInstance | None = None
        edits = None
        admin = is_admin(result)
        if admin:                    # monitoring: changes nothing on the device
            config = None
            if dev.type == C.DEVICE_TYPE_MIG:
                mig = self.mig.existing(ref, dev, h)
        elif dev.type == C.DEVICE_TYPE_MIG:
            mig = self.mig.prepare(cp, entry, ref, dev, h)
        else:
            self.mig.leave_mode_for_whole_use(dev, h)
            if uses_sharing(dev.type, config):
                e = self.sharing.prepare(cp, str(ref), ref.uid, dev.gpu.uuid, h, config,
                                         result.get("consumedCapacity"), pending=entry.devices)
                self._crash("share-set-up")
                edits = cdi.ContainerEdits(env=e.env, mounts=e.mounts or None).model_dump(by_alias=True,
                                                                                          exclude_none=True)
        share = result.get("shareID")
        ids = [cdi.device_id(self.driver_name, cdi.device_name(ref.uid, dev.name, share))]
        toolkit = self.toolkit_dirs and cdi.toolkit_device_id(self.toolkit_dirs,
                                                              mig.uuid if mig and mig.uuid else dev.gpu.uuid)
        if toolkit:
            ids.append(toolkit)
        return PreparedDevice(requestNames=[base_request(result["request"])], pool=result["pool"],
                              device=dev.name, shareID=share, cdiDeviceIDs=ids, type=dev.type,
                              gpuUUID=dev.gpu.uuid, mig=mig, config=config,
                              consumedCapacity=result.get("consumedCapacity"), edits=edits,
                              adminAccess=True if admin else None)

    def verify(self, cp: Checkpoint, ref: ClaimRef, entry: PreparedClaim) -> list[PreparedDevice]:
        """A prepared claim's MIG instances, MPS daemons and CDI spec still exist: missing ones are
        re-created (the claim keeps its CDI device IDs), or the error names what is missing."""
        rewrite = False
        for d in entry.devices:
            if d.mig is not None and not self.mig.present(d.mig):
                self.mig.recreate(cp, ref, d, self._devices().get(d.device))
                rewrite = True
            if holds_share(d) and strategy_of(d.config)[0] == "MPS":
                h = self.backend.device_by_uuid(d.gpu_uuid)
                if self.backend.compute_mode(h) != COMPUTE_MODE_EXCLUSIVE_PROCESS:     # reset by a reboot
                    log.warning("claim %s: GPU %s of its MPS share %s lost its exclusive-process compute mode: "
                                "set again", ref, d.gpu_uuid, d.device)
                    self.backend.set_compute_mode(h, COMPUTE_MODE_EXCLUSIVE_PROCESS)
                if not self.sharing.mps.running(d.gpu_uuid):
                    self.sharing.reconcile(cp)
                    if not self.sharing.mps.running(d.gpu_uuid):
                        raise PrepareError(f"claim {ref}: the MPS control daemon of GPU {d.gpu_uuid} that its share "
                                           f"{d.device} uses is not running and cannot be restarted (see the plugin "
                                           "log); unprepare and prepare the claim again, or use TimeSlicing")
        if rewrite or not self.specs.is_current(ref, entry):
            if not rewrite:
                log.warning("claim %s (uid %s): its CDI spec was missing or changed: written again", ref, ref.uid)
            self.specs.write(ref, entry)
        return entry.devices
