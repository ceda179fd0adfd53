"""Prepare and unprepare claims on this node (ARCHITECTURE §5).

For each claim the kubelet names: check the claim we read from the API server (uid, allocation, node),
take the results of our driver, resolve each device to a GPU / MIG placement / share, check it is not
in use by another claim, take the opaque configs (class first, then claim; later wins), then per device
type: whole GPU -> nothing to change (leave MIG mode if a Hopper GPU is still in it); MIG -> create the
GPU and compute instance at the allocated placement; shared -> apply the sharing settings. Then one CDI
spec per claim and the checkpoint. Prepare and unprepare are idempotent; a failed prepare undoes what
it did, so the node stays as it was.

Crash safety: a claim is checkpointed ``Preparing`` (with the MIG instances it is about to create)
before any side effect and ``Prepared`` at the end; :meth:`DeviceState.recover` at start destroys what
interrupted prepares created and drops them, so no MIG instance is orphaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

from driver.api import constants as C
from driver.api.nodeselector import NodeFacts
from driver.inventory import Inventory, discover
from driver.nvml import NvmlBackend, NvmlError
from driver.nvml.interface import CI_PROFILE_FOR_SLICES, Placement
from driver.plugin import cdi
from driver.plugin.admission import AdmissionError, admit, check_allocated_here
from driver.plugin.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    MigInstance,
    PreparedClaim,
    PreparedDevice,
)
from driver.plugin.config import ConfigError, effective_configs
from driver.plugin.devices import DeviceRef, device_index
from driver.plugin.faults import crash_point
from driver.plugin.mps import MpsDaemons
from driver.plugin.sharing import Sharing, SharingError, uses_sharing

log = logging.getLogger(__name__)

_RESETLESS_MIG = {"Hopper", "Blackwell"}


class PrepareError(Exception):
    """A claim cannot be prepared; the message names the claim, the field and the fix."""


@dataclass
class ClaimRef:
    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class PreparedResult:
    devices: list[PreparedDevice] = field(default_factory=list)
    error: str = ""


def base_request(name: str) -> str:
    """``gpu/sub`` -> ``gpu``: the kubelet matches containers' claim requests on base names."""
    return name.split("/", 1)[0]


def check_request(ref: ClaimRef) -> None:
    for fld in ("uid", "name", "namespace"):
        if not getattr(ref, fld):
            raise PrepareError(f"the kubelet sent a claim with an empty {fld} (namespace={ref.namespace!r}, "
                               f"name={ref.name!r}, uid={ref.uid!r}); this is a kubelet bug or a misbehaving "
                               "client — upgrade the kubelet or report it")


class DeviceState:
    """All claim preparation on this node. One per plugin process; state lives in the checkpoint."""

    def __init__(self, *, driver_name: str, node_name: str, backend: NvmlBackend, inventory: Inventory,
                 cdi_root: Path, plugin_dir: Path, cdi_search_dirs: list[Path] | None = None,
                 on_inventory_change: Callable[[Inventory], None] | None = None,
                 node_labels: Mapping[str, str] | None = None):
        self.driver_name = driver_name
        self.node_name = node_name
        #: this Node's labels (for allocations whose nodeSelector tests labels); None until read
        self.node_labels = node_labels
        self.backend = backend
        self.cdi_root = cdi_root
        self.plugin_dir = plugin_dir
        self.checkpoint = CheckpointStore(plugin_dir / "checkpoint.json")
        self._cdi_search = cdi_search_dirs if cdi_search_dirs is not None else [Path("/etc/cdi"), Path("/var/run/cdi")]
        self._lock = asyncio.Lock()
        self._lock_file: Any = None
        self._on_inventory_change = on_inventory_change
        self.prepared_count = 0
        self.sharing = Sharing(backend, MpsDaemons(plugin_dir / "mps", backend.kind))
        self.set_inventory(inventory)

    def set_inventory(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._devices = device_index(inventory)

    def _refresh_inventory(self) -> None:
        self.set_inventory(discover(self.backend, self.node_name))
        if self._on_inventory_change:
            self._on_inventory_change(self.inventory)

    # -- serialization --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """Excludes a second plugin instance (rolling update) sharing the plugin directory. The lock
        file stays open for the plugin's lifetime; waiting for the other instance never blocks the loop."""
        if self._lock_file is None:
            self.plugin_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.plugin_dir / "serialize.lock", "a+")  # noqa: SIM115 - kept open
        f = self._lock_file
        deadline = time.monotonic() + 30
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PrepareError(f"another plugin instance holds {self.plugin_dir / 'serialize.lock'} "
                                       "for more than 30s; retrying later") from None
                await asyncio.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.asynccontextmanager
    async def _checkpoint_session(self) -> AsyncIterator[Checkpoint | CheckpointError]:
        """Serialized access (this process and a second plugin instance) to the checkpoint read at its
        start: yields it, or the error that makes it unreadable (logged; the file is left untouched)."""
        async with self._lock:
            async with self._file_lock():
                try:
                    cp: Checkpoint | CheckpointError = self.checkpoint.read()
                except CheckpointError as e:
                    log.error("%s", e)
                    cp = e
                yield cp

    # -- prepare --------------------------------------------------------------------------------
    async def prepare(self, claims: list[tuple[ClaimRef, dict | Exception]]) -> dict[str, PreparedResult]:
        """``claims``: each kubelet claim with the ResourceClaim read from the API server (or the error
        reading it). Returns one result per claim UID."""
        out: dict[str, PreparedResult] = {}
        async with self._checkpoint_session() as cp:
            if isinstance(cp, CheckpointError):
                return {ref.uid: PreparedResult(error=str(cp)) for ref, _ in claims}
            for ref, claim in claims:
                try:
                    if isinstance(claim, Exception):
                        raise claim
                    out[ref.uid] = PreparedResult(devices=self._prepare_one(cp, ref, claim))
                except (PrepareError, AdmissionError, ConfigError, SharingError) as e:
                    log.warning("prepare of claim %s (uid %s) failed: %s", ref, ref.uid, e)
                    out[ref.uid] = PreparedResult(error=str(e))
                except NvmlError as e:
                    log.warning("prepare of claim %s (uid %s) failed in NVML: %s", ref, ref.uid, e)
                    out[ref.uid] = PreparedResult(error=f"claim {ref}: {e}")
                except Exception as e:  # noqa: BLE001 - a bug must not take the plugin down
                    log.exception("prepare of claim %s (uid %s) failed unexpectedly", ref, ref.uid)
                    out[ref.uid] = PreparedResult(error=f"claim {ref}: internal error: {e}")
            self.prepared_count = len(cp.claims)
        return out

    def _check_claim(self, ref: ClaimRef, claim: dict) -> list[dict]:
        check_request(ref)
        md = claim.get("metadata") or {}
        if md.get("uid") != ref.uid:
            raise PrepareError(f"claim {ref} has uid {md.get('uid')} but the kubelet asked for uid {ref.uid}: the "
                               "claim was deleted and re-created; the kubelet retries with the new claim")
        allocation = (claim.get("status") or {}).get("allocation")
        if not allocation:
            raise PrepareError(f"claim {ref} (uid {ref.uid}) has no status.allocation: it is not allocated; "
                               "the kubelet retries once the scheduler or the Partita controller allocates it")
        check_allocated_here(str(ref), allocation, NodeFacts(self.node_name, self.node_labels))
        results = [r for r in (allocation.get("devices") or {}).get("results") or []
                   if r.get("driver") == self.driver_name]
        for r in results:
            if r.get("pool") != self.node_name:
                raise PrepareError(f"claim {ref}: status.allocation.devices.results device {r.get('device')} is in "
                                   f"pool {r.get('pool')}, which is another node's; only pool {self.node_name} "
                                   "is prepared here")
        return results

    def _prepare_one(self, cp: Checkpoint, ref: ClaimRef, claim: dict) -> list[PreparedDevice]:
        results = self._check_claim(ref, claim)
        existing = cp.claims.get(ref.uid)
        if existing is not None and existing.state == "Prepared":
            # Idempotent: the kubelet asks again after its own restart. Re-create the CDI spec if the
            # node rebooted and /var/run lost it; nothing else changes.
            path = Path(existing.cdi_spec) if existing.cdi_spec else None
            if path is not None and not path.exists():
                cdi.write_spec(path, self._spec(ref, existing.devices))
            return existing.devices
        # The device model, whatever the allocation says: this node, one use per GPU, shares that fit.
        admit(cp.claims, ref, results, self._devices)
        if existing is not None:      # an interrupted prepare: undo it, then prepare afresh
            self._undo(existing)
            del cp.claims[ref.uid]
            self.checkpoint.write(cp)
        refs = []
        for r in results:
            dev = self._devices.get(r.get("device", ""))
            if dev is None:
                raise PrepareError(f"claim {ref}: status.allocation.devices.results names device "
                                   f"{r.get('device')!r} in pool {r.get('pool')}, which this node does not publish "
                                   f"(known: {len(self._devices)} devices); the allocation is stale or corrupt — "
                                   "delete the claim so it is allocated again")
            refs.append((r, dev))
        configs = effective_configs(claim, self.driver_name, [r for r, _ in refs])
        claim_entry = PreparedClaim(uid=ref.uid, namespace=ref.namespace, name=ref.name, state="Preparing")
        devices: list[PreparedDevice] = []
        try:
            for (r, dev), config in zip(refs, configs):
                d = self._prepare_device(cp, claim_entry, ref, r, dev, config)
                devices.append(d)
                # entry.devices may hold a placeholder for a MIG device being created: now it is done
                claim_entry.devices = list(devices)
            spec_path = cdi.spec_path(self.cdi_root, self.driver_name, ref.uid)
            cdi.write_spec(spec_path, self._spec(ref, devices))
            claim_entry.devices = devices
            claim_entry.cdi_spec = str(spec_path)
            self._crash("cdi-spec-written")
            claim_entry.state = "Prepared"
            cp.claims[ref.uid] = claim_entry
            self.checkpoint.write(cp)
            self._crash("claim-prepared")
        except BaseException:
            self._undo(claim_entry)   # devices done so far plus any MIG placeholder being created
            cdi.remove_spec(cdi.spec_path(self.cdi_root, self.driver_name, ref.uid))
            cp.claims.pop(ref.uid, None)
            with contextlib.suppress(Exception):
                self.sharing.release_unused(cp, [dev.gpu.uuid for (_, dev), config in zip(refs, configs)
                                                 if uses_sharing(dev.type, config)])
            with contextlib.suppress(Exception):
                self.checkpoint.write(cp)
            raise
        log.info("prepared claim %s (uid %s): %s", ref, ref.uid, ", ".join(d.device for d in devices) or "no devices")
        return devices

    def _prepare_device(self, cp: Checkpoint, entry: PreparedClaim, ref: ClaimRef, result: dict, dev: DeviceRef,
                        config: dict | None) -> PreparedDevice:
        h = self.backend.device_by_uuid(dev.gpu.uuid)
        mig: MigInstance | None = None
        edits = None
        if dev.type == C.DEVICE_TYPE_MIG:
            mig = self._prepare_mig(cp, entry, ref, dev, h)
        else:
            self._leave_mig_mode(dev, h)
            if uses_sharing(dev.type, config):
                e = self.sharing.prepare(cp, str(ref), ref.uid, dev.gpu.uuid, h, config,
                                         result.get("consumedCapacity"), pending=entry.devices)
                edits = cdi.ContainerEdits(env=e.env, mounts=e.mounts or None).model_dump(by_alias=True,
                                                                                          exclude_none=True)
        share = result.get("shareID")
        cdi_name = f"{ref.uid}-{dev.name}" + (f"-{share}" if share else "")
        ids = [cdi.device_id(self.driver_name, cdi_name)]
        if self.backend.kind == "real":
            toolkit = cdi.toolkit_device_id(self._cdi_search, mig.uuid if mig and mig.uuid else dev.gpu.uuid)
            if toolkit:
                ids.append(toolkit)
        return PreparedDevice(requestNames=[base_request(result["request"])], pool=result["pool"],
                              device=dev.name, shareID=share, cdiDeviceIDs=ids, type=dev.type,
                              gpuUUID=dev.gpu.uuid, mig=mig, config=config,
                              consumedCapacity=result.get("consumedCapacity"), edits=edits)

    def _leave_mig_mode(self, dev: DeviceRef, h: Any) -> None:
        """A Hopper GPU left in MIG mode by earlier MIG claims returns to whole use."""
        if not dev.gpu.mig_capable or dev.gpu.architecture not in _RESETLESS_MIG:
            return
        if self.backend.mig_mode(h).current:
            if self.backend.gpu_instances(h):
                raise PrepareError(f"GPU {dev.gpu.uuid} still has MIG instances; it cannot be used as "
                                   f"{dev.type} device {dev.name} until they are gone")
            self.backend.set_mig_mode(h, False)
            log.info("disabled MIG mode on GPU %s for %s use", dev.gpu.uuid, dev.type)

    def _prepare_mig(self, cp: Checkpoint, entry: PreparedClaim, ref: ClaimRef, dev: DeviceRef, h: Any) -> MigInstance:
        assert dev.profile is not None and dev.placement_start is not None
        placement = Placement(dev.placement_start, dev.profile.memory_slices)
        for d in self.backend.mig_devices(h) if self.backend.mig_mode(h).current else []:
            if d.profile_id == dev.profile.profile_id and d.placement == placement:
                # An instance exists already (static MIG, created outside Partita): use it as it is.
                return MigInstance(gpuUUID=dev.gpu.uuid, profileID=d.profile_id, placementStart=placement.start,
                                   placementSize=placement.size, gpuInstanceID=d.gpu_instance_id,
                                   computeInstanceID=d.compute_instance_id, uuid=d.uuid, created=False)
        mig = MigInstance(gpuUUID=dev.gpu.uuid, profileID=dev.profile.profile_id, placementStart=placement.start,
                          placementSize=placement.size)
        # Record the intent before creating anything, so a crash leaves a trace to undo.
        entry.devices = entry.devices + [PreparedDevice(requestNames=[], pool=self.node_name, device=dev.name,
                                                        cdiDeviceIDs=[], type=dev.type, gpuUUID=dev.gpu.uuid, mig=mig)]
        cp.claims[ref.uid] = entry
        self.checkpoint.write(cp)
        self._crash("mig-intent-recorded")
        mode = self.backend.mig_mode(h)
        if not mode.current:
            if not self.backend.set_mig_mode(h, True):
                raise PrepareError(f"claim {ref}: MIG device {dev.name} needs MIG mode on GPU {dev.gpu.uuid}, which "
                                   f"({dev.gpu.architecture}) applies it only after a GPU reset; enable MIG on this GPU "
                                   "(nvidia-smi -i <gpu> -mig 1 and a reset) or allocate another device")
            log.info("enabled MIG mode on GPU %s", dev.gpu.uuid)
            self._crash("mig-mode-enabled")
        gi = self.backend.create_gpu_instance(h, dev.profile.profile_id, placement)
        self._crash("gpu-instance-created")
        mig.gpu_instance_id = gi
        self.checkpoint.write(cp)
        self._crash("gpu-instance-recorded")
        ci_info = self.backend.compute_instance_profile_info(h, gi, CI_PROFILE_FOR_SLICES[dev.profile.compute_slices])
        ci = self.backend.create_compute_instance(h, gi, ci_info.id)
        self._crash("compute-instance-created")
        mig.compute_instance_id = ci
        mig.uuid = next(d.uuid for d in self.backend.mig_devices(h) if d.gpu_instance_id == gi and d.compute_instance_id == ci)
        self.checkpoint.write(cp)
        self._crash("mig-device-recorded")
        log.info("created MIG device %s (%s at %d:%d) on GPU %s", mig.uuid, dev.profile.name, placement.start,
                 placement.size, dev.gpu.uuid)
        return mig

    def _undo(self, entry: PreparedClaim) -> None:
        """Destroy what a (possibly interrupted) prepare of this claim created."""
        for d in entry.devices:
            if d.mig is not None and d.mig.created:
                self._destroy_mig(d.mig)

    def _destroy_mig(self, mig: MigInstance) -> None:
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        if not self.backend.mig_mode(h).current:
            return
        placement = Placement(mig.placement_start, mig.placement_size)
        for gi in self.backend.gpu_instances(h):
            # Profile and placement always match: after a crash between a destroy and the checkpoint, a
            # recorded instance id may since have been reused by another claim's instance elsewhere.
            if gi.profile_id == mig.profile_id and gi.placement == placement and (
                    mig.gpu_instance_id is None or gi.id == mig.gpu_instance_id):
                self.backend.destroy_mig_device(h, gi.id)
                self._crash("mig-destroyed")
                log.info("destroyed MIG instance %s (GPU instance %d) on GPU %s", mig.uuid or "(unnamed)", gi.id,
                         mig.gpu_uuid)

    def _spec(self, ref: ClaimRef, devices: list[PreparedDevice]) -> cdi.CdiSpec:
        cdi_devices = []
        for d in devices:
            visible = d.mig.uuid if d.mig is not None and d.mig.uuid else d.gpu_uuid
            env = [f"NVIDIA_VISIBLE_DEVICES={visible}", f"PARTITA_DEVICE={d.device}", f"PARTITA_DEVICE_TYPE={d.type}",
                   f"PARTITA_GPU_UUID={d.gpu_uuid}"]
            if d.mig is not None and d.mig.uuid:
                env.append(f"PARTITA_MIG_UUID={d.mig.uuid}")
            if d.share_id:
                env.append(f"PARTITA_SHARE_ID={d.share_id}")
            extra = cdi.ContainerEdits.model_validate(d.edits or {})
            name = d.cdi_device_ids[0].split("=", 1)[1]
            cdi_devices.append(cdi.CdiDevice(name=name, containerEdits=cdi.ContainerEdits(
                env=env + (extra.env or []), mounts=extra.mounts)))
        common = [f"PARTITA_CLAIM={ref.namespace}/{ref.name}", f"PARTITA_CLAIM_UID={ref.uid}",
                  f"PARTITA_NODE={self.node_name}"]
        return cdi.build_spec(self.driver_name, cdi_devices, common)

    # -- unprepare ------------------------------------------------------------------------------
    async def unprepare(self, claims: list[ClaimRef]) -> dict[str, str]:
        """Error string per claim UID ("" = done). Unknown claims are success."""
        out: dict[str, str] = {}
        async with self._checkpoint_session() as cp:
            if isinstance(cp, CheckpointError):
                return {ref.uid: str(cp) for ref in claims}
            changed = False
            released: list[str] = []
            for ref in claims:
                if not ref.uid:
                    out[ref.uid] = (f"the kubelet sent a claim with an empty uid ({ref.namespace}/{ref.name}); "
                                    "nothing to unprepare")
                    continue
                entry = cp.claims.get(ref.uid)
                if entry is None:
                    out[ref.uid] = ""
                    continue
                try:
                    self._undo(entry)
                    self._maybe_leave_mig(entry)
                except NvmlError as e:
                    out[ref.uid] = f"claim {ref}: {e}; the kubelet retries"
                    continue
                cdi.remove_spec(Path(entry.cdi_spec) if entry.cdi_spec else
                                cdi.spec_path(self.cdi_root, self.driver_name, ref.uid))
                self._crash("cdi-spec-removed")
                del cp.claims[ref.uid]
                released += [d.gpu_uuid for d in entry.devices if uses_sharing(d.type, d.config)]
                changed = True
                out[ref.uid] = ""
                log.info("unprepared claim %s (uid %s)", ref, ref.uid)
            if released:
                self.sharing.release_unused(cp, released)
            if changed:
                self.checkpoint.write(cp)
            self.prepared_count = len(cp.claims)
        return out

    def _maybe_leave_mig(self, entry: PreparedClaim) -> None:
        """After the last Partita-created MIG device of a Hopper GPU goes, return it to whole use."""
        for d in entry.devices:
            if d.mig is None or not d.mig.created:
                continue
            gpu = next((g for g in self.inventory.gpus if g.uuid == d.gpu_uuid), None)
            if gpu is None or gpu.architecture not in _RESETLESS_MIG:
                continue
            h = self.backend.device_by_uuid(d.gpu_uuid)
            if self.backend.mig_mode(h).current and not self.backend.gpu_instances(h):
                self.backend.set_mig_mode(h, False)
                log.info("disabled MIG mode on GPU %s: its last MIG device is gone", d.gpu_uuid)
                self._crash("mig-mode-disabled")

    # -- start-up recovery ----------------------------------------------------------------------
    async def recover(self) -> list[str]:
        """Undo prepares a crash interrupted (claims still ``Preparing``). Returns their UIDs."""
        async with self._checkpoint_session() as cp:
            if isinstance(cp, CheckpointError):
                return []
            undone = []
            released: list[str] = []
            for uid, entry in list(cp.claims.items()):
                if entry.state == "Preparing":
                    released += [d.gpu_uuid for d in entry.devices if uses_sharing(d.type, d.config)]
                    self._undo(entry)
                    self._maybe_leave_mig(entry)
                    cdi.remove_spec(cdi.spec_path(self.cdi_root, self.driver_name, uid))
                    del cp.claims[uid]
                    undone.append(uid)
                    log.warning("undid the interrupted prepare of claim %s/%s (uid %s)", entry.namespace,
                                entry.name, uid)
            if undone:
                self.checkpoint.write(cp)
            self.sharing.release_unused(cp, released)
            self.sharing.reconcile(cp)
            return undone

    def _crash(self, point: str) -> None:
        crash_point(point, self.backend.kind)

    def prepared_claims(self) -> dict[str, PreparedClaim]:
        return self.checkpoint.read().claims
