"""Shared GPUs at prepare time (docs/architecture.md §5, §6): time-slicing and MPS, per GPU.

Every share (one ``shareID`` of a GPU's shared device) gets its own CDI device. The first share of a GPU
sets the GPU up for its strategy; later shares join it; the last share's unprepare restores the GPU's
defaults (time-slice ``Default``, compute mode ``Default``, no MPS daemon).

* ``TimeSlicing``: the GPU's compute time-slice is set to the config's interval by the first share. A
  later share asking another interval runs with the GPU's current one (the interval is a per-GPU
  setting); the plugin logs it and the share's ``PARTITA_TIME_SLICE`` says what applies.
* ``MPS``: the first share puts the GPU in ``ExclusiveProcess`` compute mode and starts its MPS control
  daemon with the config's defaults; each share's container gets the daemon's pipe directory (only that:
  the daemon's logs and identity stay in the plugin's private directory) mounted where CUDA looks for
  it, ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` from the memory the share was allocated (its consumed
  capacity), and ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` from the config.

A whole GPU whose claim carries a GpuConfig is set up the same way: that is how several pods share one
GPU through one ResourceClaim where consumable capacity (shared devices) is off.

An admin-access result (monitoring) on a shared device or a GPU is never a share: it sets nothing up
(no time-slice change, no MPS daemon), is not counted by :meth:`Sharing.shares_of`, and its unprepare
restores nothing (:func:`holds_share`).

Time-slicing and MPS shares cannot run on one GPU at once (MPS needs the GPU to itself in exclusive-
process mode): such a prepare fails with both claims named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from driver.api import constants as C
from driver.api.config import DEFAULT_INTERVAL, GpuConfig, MpsConfig, settings_of
from driver.api.config import Sharing as SharingSettings
from driver.api.quantity import Quantity, QuantityError
from driver.errors import PartitaError
from driver.nvml import NvmlBackend
from driver.nvml.errors import NotSupportedError
from driver.nvml.interface import COMPUTE_MODE_DEFAULT, COMPUTE_MODE_EXCLUSIVE_PROCESS
from driver.plugin import cdi
from driver.plugin.checkpoint import Checkpoint, PreparedDevice
from driver.plugin.mps import CONTAINER_PIPE_DIR, MpsDaemons, MpsError

log = logging.getLogger(__name__)



class SharingError(PartitaError):
    """A share cannot be set up; the message names the claim, the GPU and the fix."""


@dataclass
class ShareEdits:
    env: list[str] = field(default_factory=list)
    mounts: list[cdi.Mount] = field(default_factory=list)


def strategy_of(config: GpuConfig | None) -> tuple[str, SharingSettings]:
    """The strategy a device's shares use and its settings, defaults filled in (no config: the defaults)."""
    settings = settings_of(config)
    return settings.strategy, settings


def _mib(quantity: str, where: str) -> int:
    try:
        return max(1, Quantity.parse(quantity).as_int() // (1 << 20))
    except QuantityError as e:
        raise SharingError(f"{where}: {e}") from None


def uses_sharing(device_type: str, config: GpuConfig | None) -> bool:
    """Shares of a shared device, and whole GPUs whose claim carries a GpuConfig (one claim used by
    several pods: the fallback when consumable capacity is off)."""
    return device_type == C.DEVICE_TYPE_SHARED or (device_type == C.DEVICE_TYPE_GPU and config is not None)


def holds_share(d: PreparedDevice) -> bool:
    """A prepared device that holds a share of its GPU's sharing set-up (admin access never does)."""
    return uses_sharing(d.type, d.config) and not d.admin_access


class Sharing:
    def __init__(self, backend: NvmlBackend, mps: MpsDaemons):
        self.backend = backend
        self.mps = mps

    @staticmethod
    def shares_of(cp: Checkpoint, gpu_uuid: str, *, exclude_uid: str | None = None) -> list[tuple[str, PreparedDevice]]:
        """(claim namespace/name, device) of every share of the GPU prepared or being prepared."""
        return [(f"{c.namespace}/{c.name}", d) for c in cp.claims.values() if c.uid != exclude_uid
                for d in c.devices if holds_share(d) and d.gpu_uuid == gpu_uuid]

    def prepare(self, cp: Checkpoint, claim: str, claim_uid: str, gpu_uuid: str, h: object, config: GpuConfig | None,
                consumed: dict | None, pending: Iterable[PreparedDevice] = ()) -> ShareEdits:
        strategy, settings = strategy_of(config)
        others = self.shares_of(cp, gpu_uuid, exclude_uid=claim_uid) + [
            (claim, d) for d in pending if holds_share(d) and d.gpu_uuid == gpu_uuid]
        for other, d in others:
            theirs, _ = strategy_of(d.config)
            if theirs != strategy:
                raise SharingError(
                    f"claim {claim}: GPU {gpu_uuid} is shared with {theirs} by claim {other}, and this claim asks "
                    f"for {strategy}; one GPU serves one sharing strategy at a time (MPS needs exclusive-process "
                    "mode). Give both claims the same GpuConfig sharing.strategy, or keep them apart with "
                    "separate DeviceClasses that select different GPUs")
        edits = ShareEdits(env=[f"PARTITA_SHARING_STRATEGY={strategy}"])
        memory = (consumed or {}).get("memory")
        if memory:
            edits.env.append(f"PARTITA_SHARED_MEMORY={memory}")
        if strategy == "TimeSlicing":
            wanted = settings.time_slicing_config.interval if settings.time_slicing_config else DEFAULT_INTERVAL
            current = self.backend.time_slice(h)
            if not others and current != wanted:
                self.backend.set_time_slice(h, wanted)
                current = wanted
            elif current != wanted:
                log.warning("claim %s asks time-slice %s on GPU %s, which already runs at %s for %d other share(s); "
                            "it keeps %s", claim, wanted, gpu_uuid, current, len(others), current)
            edits.env.append(f"PARTITA_TIME_SLICE={current}")
            return edits
        # MPS
        mps = settings.mps_config or MpsConfig()
        pct, default_limit = mps.default_active_thread_percentage, mps.default_pinned_device_memory_limit
        try:
            if not others:
                if self.backend.compute_mode(h) != COMPUTE_MODE_EXCLUSIVE_PROCESS:
                    self.backend.set_compute_mode(h, COMPUTE_MODE_EXCLUSIVE_PROCESS)
                self.mps.start(gpu_uuid, pct, f"{_mib(default_limit, 'mpsConfig.defaultPinnedDeviceMemoryLimit')}M"
                               if default_limit else None)
            elif not self.mps.running(gpu_uuid):      # e.g. after a node reboot
                self.mps.start(gpu_uuid, pct)
        except MpsError as e:
            raise SharingError(f"claim {claim}: {e}") from None
        dirs = self.mps.dirs(gpu_uuid)
        edits.mounts = [cdi.Mount(hostPath=str(dirs.pipe), containerPath=CONTAINER_PIPE_DIR, options=["rw", "bind"])]
        edits.env.append(f"CUDA_MPS_PIPE_DIRECTORY={CONTAINER_PIPE_DIR}")
        limit = memory or default_limit
        if limit:
            edits.env.append(f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0={_mib(limit, 'consumed memory')}M")
        if pct is not None:
            edits.env.append(f"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE={pct}")
        return edits

    def release_unused(self, cp: Checkpoint, gpu_uuids: Iterable[str]) -> None:
        """For each GPU no share uses any more (per ``cp``): stop MPS and restore the defaults."""
        for uuid in sorted(set(gpu_uuids)):
            if self.shares_of(cp, uuid):
                continue
            h = self.backend.device_by_uuid(uuid)
            try:
                self.mps.stop(uuid)
            except MpsError as e:
                log.warning("%s", e)
            if self.backend.compute_mode(h) != COMPUTE_MODE_DEFAULT:
                self.backend.set_compute_mode(h, COMPUTE_MODE_DEFAULT)
            if self.backend.time_slice(h) != DEFAULT_INTERVAL and not self._mig_on(h):
                self.backend.set_time_slice(h, DEFAULT_INTERVAL)
            log.info("GPU %s has no shares left: restored its defaults", uuid)

    def _mig_on(self, h: object) -> bool:
        try:
            return self.backend.mig_mode(h).current
        except NotSupportedError:        # not MIG capable (L4, T4, ...)
            return False

    def restore_unshared(self, cp: Checkpoint, gpu_uuids: Iterable[str]) -> None:
        """Of ``gpu_uuids``, those no share uses (per ``cp``) whose settings are not the defaults get them back:
        a crash between a share's set-up and its checkpoint record left them so."""
        for uuid in sorted(set(gpu_uuids)):
            if self.shares_of(cp, uuid):
                continue
            h = self.backend.device_by_uuid(uuid)
            if self.backend.compute_mode(h) != COMPUTE_MODE_DEFAULT or self.mps.running(uuid) or (
                    not self._mig_on(h) and self.backend.time_slice(h) != DEFAULT_INTERVAL):
                log.warning("GPU %s keeps sharing settings that no prepared claim uses (an interrupted prepare): "
                            "restoring its defaults", uuid)
                self.release_unused(cp, [uuid])

    def reconcile(self, cp: Checkpoint) -> None:
        """At start: restart daemons prepared MPS shares need (after a reboot), stop orphaned ones."""
        wanted = {d.gpu_uuid for c in cp.claims.values() if c.state == "Prepared" for d in c.devices
                  if holds_share(d) and strategy_of(d.config)[0] == "MPS"}
        for uuid in self.mps.running_gpus():
            if uuid not in wanted:
                log.warning("stopping the MPS control daemon of GPU %s: no prepared claim uses it", uuid)
                self.release_unused(cp, [uuid])
        for uuid in wanted:
            if not self.mps.running(uuid):
                _, settings = strategy_of(next(d.config for _, d in self.shares_of(cp, uuid)))
                mps = settings.mps_config or MpsConfig()
                limit = mps.default_pinned_device_memory_limit
                try:
                    self.mps.start(uuid, mps.default_active_thread_percentage,
                                   f"{_mib(limit, 'mpsConfig.defaultPinnedDeviceMemoryLimit')}M" if limit else None)
                except (MpsError, SharingError) as e:
                    log.error("could not restart the MPS control daemon of GPU %s: %s", uuid, e)
