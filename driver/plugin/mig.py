"""MIG devices of claims: create, destroy, re-create, and the MIG mode changes they need, each step with
its crash point (:mod:`driver.plugin.faults`) (docs/architecture.md §5).

Crash safety: a MIG device is recorded in the checkpoint (its intent: GPU, profile, placement) before
anything is created, and each instance id as soon as it exists, so an interrupted prepare leaves a trace
the next call undoes (:meth:`MigDevices.destroy`, matched by profile and placement, never by a recorded id
alone). A MIG device that already exists at the allocated placement (static MIG, created outside Partita)
is used as it is and never destroyed (``created: false``). Admin access never creates anything: it uses
the instance that exists (:meth:`MigDevices.existing`).

A Hopper GPU (MIG mode without reset) enters MIG mode for its first MIG device and leaves it when its last
Partita-created MIG device is gone, or when it is used whole or shared; an Ampere GPU changes mode only
with a reset, which Partita never does (the prepare fails saying so).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from driver.inventory import Gpu
from driver.nvml import NvmlBackend, NvmlError
from driver.nvml.interface import CI_PROFILE_FOR_SLICES, MIG_MODE_WITHOUT_RESET, Placement
from driver.plugin.checkpoint import Checkpoint, CheckpointStore, MigInstance, PreparedClaim, PreparedDevice
from driver.plugin.claimref import ClaimRef, PrepareError
from driver.plugin.devices import DeviceRef

log = logging.getLogger(__name__)


class MigDevices:
    """The MIG side of prepare and unprepare. ``crash(point)`` is called at each crash point."""

    def __init__(self, backend: NvmlBackend, checkpoint: CheckpointStore, node_name: str,
                 crash: Callable[[str], None]):
        self.backend = backend
        self.checkpoint = checkpoint
        self.node_name = node_name
        self._crash = crash

    # -- mode -----------------------------------------------------------------------------------
    def leave_mode_for_whole_use(self, dev: DeviceRef, h: Any) -> None:
        """A Hopper GPU left in MIG mode by earlier MIG claims returns to whole use."""
        if not dev.gpu.mig_capable or dev.gpu.architecture not in MIG_MODE_WITHOUT_RESET:
            return
        if self.backend.mig_mode(h).current:
            if self.backend.gpu_instances(h):
                raise PrepareError(f"GPU {dev.gpu.uuid} still has MIG instances; it cannot be used as "
                                   f"{dev.type} device {dev.name} until they are gone")
            self.backend.set_mig_mode(h, False)
            log.info("disabled MIG mode on GPU %s for %s use", dev.gpu.uuid, dev.type)

    def leave_mode_if_unused(self, entry: PreparedClaim, gpus: list[Gpu]) -> None:
        """After the last Partita-created MIG device of a Hopper GPU goes, return it to whole use."""
        for d in entry.devices:
            if d.mig is None or not d.mig.created:
                continue
            gpu = next((g for g in gpus if g.uuid == d.gpu_uuid), None)
            if gpu is None or gpu.architecture not in MIG_MODE_WITHOUT_RESET:
                continue
            h = self.backend.device_by_uuid(d.gpu_uuid)
            if self.backend.mig_mode(h).current and not self.backend.gpu_instances(h):
                self.backend.set_mig_mode(h, False)
                log.info("disabled MIG mode on GPU %s: its last MIG device is gone", d.gpu_uuid)
                self._crash("mig-mode-disabled")

    # -- what exists ----------------------------------------------------------------------------
    def found(self, dev: DeviceRef, h: Any) -> MigInstance | None:
        """The MIG instance that exists now at the device's profile and placement (created by another claim, or
        outside Partita), or None."""
        assert dev.profile is not None and dev.placement_start is not None
        placement = Placement(dev.placement_start, dev.profile.memory_slices)
        for d in self.backend.mig_devices(h) if self.backend.mig_mode(h).current else []:
            if d.profile_id == dev.profile.profile_id and d.placement == placement:
                return MigInstance(gpuUUID=dev.gpu.uuid, profileID=d.profile_id, placementStart=placement.start,
                                   placementSize=placement.size, gpuInstanceID=d.gpu_instance_id,
                                   computeInstanceID=d.compute_instance_id, uuid=d.uuid, created=False)
        return None

    def existing(self, ref: ClaimRef, dev: DeviceRef, h: Any) -> MigInstance:
        """Admin access to a MIG device: the instance that exists at its placement now, never a new one; else an
        error naming the device."""
        found = self.found(dev, h)
        if found is not None:
            return found
        assert dev.profile is not None and dev.placement_start is not None
        raise PrepareError(f"claim {ref}: admin access to MIG device {dev.name} needs that MIG device to exist, and "
                           f"GPU {dev.gpu.uuid} has no {dev.profile.name} instance at placement {dev.placement_start}:"
                           f"{dev.profile.memory_slices}; admin access never changes a device (no MIG mode change or "
                           "instance creation) — prepare it for a workload claim first, or create it with nvidia-smi, "
                           "then the kubelet retries")

    def present(self, mig: MigInstance) -> bool:
        """The recorded MIG device still exists, with the same ids."""
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        if not self.backend.mig_mode(h).current:
            return False
        placement = Placement(mig.placement_start, mig.placement_size)
        return any(d.uuid == mig.uuid and d.profile_id == mig.profile_id and d.placement == placement
                   and d.gpu_instance_id == mig.gpu_instance_id and d.compute_instance_id == mig.compute_instance_id
                   for d in self.backend.mig_devices(h))

    @staticmethod
    def held_by_other(cp: Checkpoint, uid: str, gpu_uuid: str, gi_id: int, placement: Placement) -> bool:
        """Another claim in the checkpoint records this GPU instance as its own."""
        return any(d.mig is not None and d.mig.gpu_uuid == gpu_uuid and d.mig.gpu_instance_id == gi_id
                   and Placement(d.mig.placement_start, d.mig.placement_size) == placement
                   for c in cp.claims.values() if c.uid != uid for d in c.devices if not d.admin_access)

    # -- create ---------------------------------------------------------------------------------
    def prepare(self, cp: Checkpoint, entry: PreparedClaim, ref: ClaimRef, dev: DeviceRef, h: Any) -> MigInstance:
        """The MIG device of a workload claim: the one at the placement, or a new one (intent recorded first)."""
        found = self.found(dev, h)
        if found is not None:      # an instance exists already (static MIG, created outside Partita): used as it is
            return found
        assert dev.profile is not None and dev.placement_start is not None
        placement = Placement(dev.placement_start, dev.profile.memory_slices)
        mig = MigInstance(gpuUUID=dev.gpu.uuid, profileID=dev.profile.profile_id, placementStart=placement.start,
                          placementSize=placement.size)
        # Record the intent before creating anything, so a crash leaves a trace to undo.
        entry.devices = entry.devices + [PreparedDevice(requestNames=[], pool=self.node_name, device=dev.name,
                                                        cdiDeviceIDs=[], type=dev.type, gpuUUID=dev.gpu.uuid, mig=mig)]
        cp.claims[ref.uid] = entry
        self.checkpoint.write(cp)
        self._crash("mig-intent-recorded")
        self.create(cp, ref, dev, h, mig)
        return mig

    def create(self, cp: Checkpoint, ref: ClaimRef, dev: DeviceRef, h: Any, mig: MigInstance, *,
               adopt: bool = False) -> None:
        """Create the MIG device ``mig`` describes (its intent already in the checkpoint), recording each
        instance id as it comes. ``adopt``: a GPU instance of ours left at the placement by an interrupted
        re-creation is used instead of a new one."""
        assert dev.profile is not None
        placement = Placement(mig.placement_start, mig.placement_size)
        mode = self.backend.mig_mode(h)
        if not mode.current:
            if not self.backend.set_mig_mode(h, True):
                raise PrepareError(f"claim {ref}: MIG device {dev.name} needs MIG mode on GPU {dev.gpu.uuid}, which "
                                   f"({dev.gpu.architecture}) applies it only after a GPU reset; enable MIG on this GPU "
                                   "(nvidia-smi -i <gpu> -mig 1 and a reset) or allocate another device")
            log.info("enabled MIG mode on GPU %s", dev.gpu.uuid)
            self._crash("mig-mode-enabled")
        found = [g.id for g in self.backend.gpu_instances(h)
                 if adopt and g.profile_id == mig.profile_id and g.placement == placement
                 and not self.held_by_other(cp, ref.uid, mig.gpu_uuid, g.id, placement)]
        gi = found[0] if found else self.backend.create_gpu_instance(h, mig.profile_id, placement)
        self._crash("gpu-instance-created")
        mig.gpu_instance_id = gi
        self.checkpoint.write(cp)
        self._crash("gpu-instance-recorded")
        cis = self.backend.compute_instances(h, gi) if found else []
        if cis:
            ci = cis[0].id
        else:
            ci_info = self.backend.compute_instance_profile_info(h, gi, CI_PROFILE_FOR_SLICES[dev.profile.compute_slices])
            ci = self.backend.create_compute_instance(h, gi, ci_info.id)
        self._crash("compute-instance-created")
        mig.compute_instance_id = ci
        mig.uuid = next(d.uuid for d in self.backend.mig_devices(h) if d.gpu_instance_id == gi and d.compute_instance_id == ci)
        self.checkpoint.write(cp)
        self._crash("mig-device-recorded")
        log.info("created MIG device %s (%s at %d:%d) on GPU %s", mig.uuid, dev.profile.name, placement.start,
                 placement.size, dev.gpu.uuid)

    def recreate(self, cp: Checkpoint, ref: ClaimRef, d: PreparedDevice, dev: DeviceRef | None) -> None:
        """A prepared claim's MIG device is gone (a reboot, a crash, someone else): re-create it (the claim keeps
        its CDI device IDs), or for admin access take the instance there now; else an error naming it.
        ``dev``: the device as this node publishes it now (None: no longer published)."""
        mig = d.mig
        assert mig is not None
        what = (f"claim {ref}: its MIG device {d.device} ({mig.uuid or 'unnamed'}, profile {mig.profile_id} at "
                f"{mig.placement_start}:{mig.placement_size}) no longer exists on GPU {mig.gpu_uuid}")
        if d.admin_access:           # admin access never creates: use the instance there now, if any
            if dev is None or dev.profile is None:
                raise PrepareError(f"{what}, and this node no longer publishes that device; delete the claim so it "
                                   "is allocated again")
            d.mig = self.existing(ref, dev, self.backend.device_by_uuid(mig.gpu_uuid))
            self.checkpoint.write(cp)
            return
        if not mig.created:
            raise PrepareError(f"{what}; it was created outside Partita (static MIG), so Partita does not re-create "
                               "it — re-create it with nvidia-smi, or delete the claim so it is allocated again")
        if dev is None or dev.profile is None:
            raise PrepareError(f"{what}, and this node no longer publishes that device; delete the claim so it is "
                               "allocated again")
        log.warning("%s: re-creating it", what)
        # Intent first: from here the instance is matched by profile and placement only.
        mig.gpu_instance_id = mig.compute_instance_id = mig.uuid = None
        self.checkpoint.write(cp)
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        try:
            self.create(cp, ref, dev, h, mig, adopt=True)
        except (NvmlError, PrepareError) as e:
            raise PrepareError(f"{what} and cannot be re-created: {e}; delete the claim (and its pod) so it is "
                               "allocated again") from None

    # -- destroy --------------------------------------------------------------------------------
    def destroy(self, cp: Checkpoint, uid: str, mig: MigInstance) -> None:
        """Destroy the MIG device a claim created (idempotent: gone already is fine)."""
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        if not self.backend.mig_mode(h).current:
            return
        placement = Placement(mig.placement_start, mig.placement_size)
        for gi in self.backend.gpu_instances(h):
            # Profile and placement always match: after a crash between a destroy and the checkpoint, a
            # recorded instance id may since have been reused by another claim's instance elsewhere.
            if gi.profile_id == mig.profile_id and gi.placement == placement and (
                    mig.gpu_instance_id is None or gi.id == mig.gpu_instance_id) \
                    and not self.held_by_other(cp, uid, mig.gpu_uuid, gi.id, placement):
                self.backend.destroy_mig_device(h, gi.id)
                self._crash("mig-destroyed")
                log.info("destroyed MIG instance %s (GPU instance %d) on GPU %s", mig.uuid or "(unnamed)", gi.id,
                         mig.gpu_uuid)
