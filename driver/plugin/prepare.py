"""Prepare and unprepare claims on this node (docs/architecture.md §5).

For each claim the kubelet names: check the claim we read from the API server (uid, allocation, node),
take the results of our driver, resolve each device to a GPU / MIG placement / share, check it is not
in use by another claim, take the opaque configs (class first, then claim; later wins), then per device
type: whole GPU -> nothing to change (leave MIG mode if a Hopper GPU is still in it); MIG -> create the
GPU and compute instance at the allocated placement; shared -> apply the sharing settings. Then one CDI
spec per claim and the checkpoint. Prepare and unprepare are idempotent; a failed prepare undoes what
it did, so the node stays as it was.

Crash safety: a claim is checkpointed ``Preparing`` (with the MIG instances it is about to create)
before any side effect and ``Prepared`` at the end, and ``Unpreparing`` before unprepare destroys or
removes anything. Every call (and :meth:`DeviceState.recover` at start) first undoes interrupted prepares
and finishes interrupted unprepares, so no MIG instance or CDI spec is orphaned and no claim is answered
from a stale entry. Preparing an already prepared claim verifies its MIG instances, MPS daemons and CDI
spec still exist (re-creating them, or failing with what is missing); a node reboot (a new boot id) makes
the start-up recovery restore them for every prepared claim. A failed prepare runs every undo step even
when one fails and reports all that failed.

Admin access (a result with ``adminAccess: true``, for monitoring and maintenance) changes nothing on the
device: no MIG mode change, no MIG instance creation (a MIG device must exist already: its instance is
used as it is, else the prepare fails naming the device), no sharing set-up; its unprepare destroys
nothing. Its CDI device has the same device nodes plus ``PARTITA_ADMIN_ACCESS=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

from driver.api import constants as C
from driver.api.config import GpuConfig
from driver.api.nodeselector import NodeFacts
from driver.errors import PartitaError
from driver.inventory import Inventory, discover
from driver.nvml import NvmlBackend, NvmlError
from driver.nvml.interface import CI_PROFILE_FOR_SLICES, COMPUTE_MODE_EXCLUSIVE_PROCESS, MIG_MODE_WITHOUT_RESET, Placement
from driver.plugin import boot, cdi, durable
from driver.plugin.admission import AdmissionError, admit, check_allocated_here, is_admin
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
from driver.plugin.mps import MpsDaemons, MpsError
from driver.plugin.sharing import Sharing, SharingError, holds_share, strategy_of, uses_sharing

log = logging.getLogger(__name__)


class PrepareError(PartitaError):
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
                 node_labels: Mapping[str, str] | None = None, boot_id_file: Path | None = None):
        self.driver_name = driver_name
        self.node_name = node_name
        #: this Node's labels (for allocations whose nodeSelector tests labels); None until read
        self.node_labels = node_labels
        self.backend = backend
        self.cdi_root = cdi_root
        self.plugin_dir = plugin_dir
        self.checkpoint = CheckpointStore(plugin_dir / "checkpoint.json")
        self.boot_id_file = boot_id_file if boot_id_file is not None else boot.default_path()
        self._cdi_search = cdi_search_dirs if cdi_search_dirs is not None else [Path("/etc/cdi"), Path("/var/run/cdi")]
        self._lock = asyncio.Lock()
        self._lock_file: Any = None
        self._dirs_ready = False
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

    def _ensure_dirs(self) -> None:
        """The plugin and CDI directories are real directories that only the plugin can write: checked by
        the first call (the start-up recovery) and, until that succeeds, by every call, which answers the
        error meanwhile (never a crash loop)."""
        if self._dirs_ready:
            return
        self.checkpoint.ensure_dir()
        try:
            cdi.ensure_dir(self.cdi_root)
        except durable.DurableError as e:
            raise CheckpointError(f"{e.strerror}; the plugin prepares nothing until then") from None
        self._dirs_ready = True

    # -- serialization --------------------------------------------------------------------------
    def _open_lock_file(self) -> None:
        if self._lock_file is not None:
            return
        path = self.plugin_dir / "serialize.lock"
        try:     # never through a link planted at the path
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CheckpointError(f"cannot open the lock file {path}: {e.strerror}; remove whatever is at that "
                                  "path (a link?) and make the plugin directory writable") from None
        self._lock_file = os.fdopen(fd, "a+")

    @contextlib.asynccontextmanager
    async def _file_lock(self) -> AsyncIterator[None]:
        """Excludes a second plugin instance (rolling update) sharing the plugin directory. The lock
        file stays open for the plugin's lifetime; waiting for the other instance never blocks the loop."""
        self._open_lock_file()
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
        start: yields it, or the error that makes it unreadable (logged; the file is left untouched).
        Work a crash or a failed write interrupted (claims ``Preparing`` or ``Unpreparing``) is finished
        first, and a changed boot id is recorded."""
        async with self._lock:
            try:
                self._ensure_dirs()
                self._open_lock_file()
            except CheckpointError as e:
                log.error("%s", e)
                yield e
                return
            async with self._file_lock():
                cp: Checkpoint | CheckpointError
                try:
                    cp = self.checkpoint.read()
                    self._finish_interrupted(cp)
                except CheckpointError as e:
                    log.error("%s", e)
                    cp = e
                except Exception as e:  # noqa: BLE001 - a bug here must not crash-loop the plugin
                    log.exception("finishing interrupted work failed")
                    cp = CheckpointError(f"finishing the interrupted prepares and unprepares recorded in "
                                         f"{self.checkpoint.path} failed: internal error: {e}; see the plugin log")
                yield cp

    def _finish_interrupted(self, cp: Checkpoint) -> None:
        """Undo interrupted prepares, finish interrupted unprepares, record the boot id. An entry that
        cannot be finished now stays (logged) and is tried again by the next call."""
        changed = False
        # temp files of writes a kill interrupted (all writes happen under the file lock we hold)
        for p in durable.remove_stale_temps(self.plugin_dir, durable.temp_name_of(self.checkpoint.path)) + \
                durable.remove_stale_temps(self.cdi_root, f".{cdi.spec_path(self.cdi_root, self.driver_name, '*').name}.*.tmp"):
            log.info("removed %s, left by an interrupted write", p)
        current = boot.read_boot_id(self.boot_id_file)
        rebooted_from = None
        if current is not None and cp.boot_id != current:
            if cp.boot_id is None:
                cp.boot_id = current
                changed = True
            else:
                rebooted_from = cp.boot_id
        for uid, entry in list(cp.claims.items()):
            if entry.state == "Prepared":
                continue
            errors = self._release(cp, entry)
            if errors:
                log.error("could not finish the interrupted %s of claim %s/%s (uid %s): %s",
                          "prepare" if entry.state == "Preparing" else "unprepare", entry.namespace, entry.name,
                          uid, "; ".join(errors))
                continue
            del cp.claims[uid]
            changed = True
            log.warning("%s the interrupted %s of claim %s/%s (uid %s)",
                        "undid" if entry.state == "Preparing" else "finished",
                        "prepare" if entry.state == "Preparing" else "unprepare", entry.namespace, entry.name, uid)
        if rebooted_from is not None:
            self._restore_after_reboot(cp, rebooted_from, current)
            changed = True
        if changed:
            self.checkpoint.write(cp)

    def _restore_after_reboot(self, cp: Checkpoint, old: str, current: str | None) -> None:
        """Re-create what prepared claims had before the node rebooted. The new boot id is recorded only
        after this (with the caller's write), so a crash meanwhile restores again (idempotent)."""
        log.warning("the node rebooted (boot id %s, checkpoint written under %s): restoring the MIG instances, "
                    "CDI specs and MPS daemons of %d prepared claim(s)", current, old,
                    sum(1 for c in cp.claims.values() if c.state == "Prepared"))
        for uid, entry in list(cp.claims.items()):
            if entry.state != "Prepared":
                continue
            ref = ClaimRef(entry.namespace, entry.name, uid)
            try:
                self._verify_prepared(cp, ref, entry)
            except (PrepareError, NvmlError, SharingError) as e:
                log.error("after the reboot, claim %s (uid %s) could not be restored: %s; its next prepare "
                          "tries again", ref, uid, e)
        cp.boot_id = current

    # -- prepare --------------------------------------------------------------------------------
    async def prepare(self, claims: list[tuple[ClaimRef, dict]]) -> dict[str, PreparedResult]:
        """``claims``: each kubelet claim with the ResourceClaim read from the API server (the caller answers
        claims that could not be read). Returns one result per claim UID."""
        out: dict[str, PreparedResult] = {}
        async with self._checkpoint_session() as cp:
            if isinstance(cp, CheckpointError):
                return {ref.uid: PreparedResult(error=str(cp)) for ref, _ in claims}
            for ref, claim in claims:
                try:
                    out[ref.uid] = PreparedResult(devices=self._prepare_one(cp, ref, claim))
                except (PrepareError, AdmissionError, ConfigError, SharingError) as e:
                    log.warning("prepare of claim %s (uid %s) failed: %s", ref, ref.uid, e)
                    out[ref.uid] = PreparedResult(error=str(e))
                except (NvmlError, CheckpointError) as e:
                    log.warning("prepare of claim %s (uid %s) failed: %s", ref, ref.uid, e)
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
            # Idempotent: the kubelet asks again after its own restart. What the claim had must still be
            # there (a reboot or a crash may have taken it): re-created, or a clear error.
            return self._verify_prepared(cp, ref, existing)
        # The device model, whatever the allocation says: this node, one use per GPU, shares that fit.
        admit(cp.claims, ref, results, self._devices)
        if existing is not None:      # an interrupted prepare or unprepare the session could not finish
            errors = self._release(cp, existing)
            if errors:
                raise PrepareError(f"claim {ref}: its interrupted {existing.state.lower()} cannot be finished: "
                                   f"{'; '.join(errors)}")
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
        spec_path = cdi.spec_path(self.cdi_root, self.driver_name, ref.uid)
        try:
            for (r, dev), config in zip(refs, configs):
                d = self._prepare_device(cp, claim_entry, ref, r, dev, config)
                devices.append(d)
                # entry.devices may hold a placeholder for a MIG device being created: now it is done
                claim_entry.devices = list(devices)
            self._write_spec(ref, spec_path, devices)
            claim_entry.devices = devices
            claim_entry.cdi_spec = str(spec_path)
            self._crash("cdi-spec-written")
            claim_entry.state = "Prepared"
            cp.claims[ref.uid] = claim_entry
            self.checkpoint.write(cp)
            self._crash("claim-prepared")
        except BaseException as e:
            errors = self._rollback(cp, ref, claim_entry, spec_path,
                                    [dev.gpu.uuid for (r, dev), config in zip(refs, configs)
                                     if uses_sharing(dev.type, config) and not is_admin(r)])
            if not errors or not isinstance(e, Exception):
                raise
            first = str(e) if isinstance(e, (PrepareError, ConfigError, SharingError)) else f"claim {ref}: {e}"
            raise PrepareError(f"{first}; undoing the prepare also failed (retried by the next call): "
                               f"{'; '.join(errors)}") from None
        log.info("prepared claim %s (uid %s): %s", ref, ref.uid, ", ".join(d.device for d in devices) or "no devices")
        return devices

    def _write_spec(self, ref: ClaimRef, path: Path, devices: list[PreparedDevice]) -> None:
        try:
            cdi.write_spec(path, self._spec(ref, devices))
        except durable.DurableError as e:
            raise PrepareError(f"claim {ref}: {e.strerror}") from None

    def _rollback(self, cp: Checkpoint, ref: ClaimRef, entry: PreparedClaim, spec_path: Path,
                  shared_gpus: list[str]) -> list[str]:
        """Undo a failed prepare, every step even when one fails; returns what failed."""
        errors = self._undo(cp, entry)
        errors += self._try(self._maybe_leave_mig, entry)
        errors += self._try(self._remove_spec, spec_path)
        persisted = ref.uid in cp.claims
        cp.claims.pop(ref.uid, None)
        for uuid in sorted(set(shared_gpus)):
            errors += self._try(self.sharing.release_unused, cp, [uuid])
        if errors:       # keep the entry so the next call finishes the undo
            entry.state = "Preparing"
            cp.claims[ref.uid] = entry
        if persisted or errors:
            errors += self._try(self.checkpoint.write, cp)
        return errors

    @staticmethod
    def _remove_spec(path: Path) -> None:
        """Only when there is one: removing a missing file from a read-only directory is an error too."""
        if path.exists() or path.is_symlink():
            cdi.remove_spec(path)

    @staticmethod
    def _try(step: Callable[..., Any], *args: Any) -> list[str]:
        try:
            step(*args)
        except durable.DurableError as e:
            return [e.strerror]
        except (NvmlError, CheckpointError, SharingError, MpsError, PrepareError, OSError) as e:
            return [str(e)]
        return []

    def _verify_prepared(self, cp: Checkpoint, ref: ClaimRef, entry: PreparedClaim) -> list[PreparedDevice]:
        """A prepared claim's MIG instances, MPS daemons and CDI spec still exist: missing ones are
        re-created (the claim keeps its CDI device IDs), or the error names what is missing."""
        for d in entry.devices:
            if d.mig is not None and not self._mig_present(d.mig):
                self._recreate_mig(cp, ref, entry, d)
            if holds_share(d) and strategy_of(d.config)[0] == "MPS":
                h = self.backend.device_by_uuid(d.gpu_uuid)
                if self.backend.compute_mode(h) != COMPUTE_MODE_EXCLUSIVE_PROCESS:     # reset by a reboot
                    log.warning("claim %s: GPU %s of its MPS share %s lost its exclusive-process compute mode: "
                                "set again", ref, d.gpu_uuid, d.device)
                    self.backend.set_compute_mode(h, COMPUTE_MODE_EXCLUSIVE_PROCESS)
            if holds_share(d) and strategy_of(d.config)[0] == "MPS" \
                    and not self.sharing.mps.running(d.gpu_uuid):
                self.sharing.reconcile(cp)
                if not self.sharing.mps.running(d.gpu_uuid):
                    raise PrepareError(f"claim {ref}: the MPS control daemon of GPU {d.gpu_uuid} that its share "
                                       f"{d.device} uses is not running and cannot be restarted (see the plugin "
                                       "log); unprepare and prepare the claim again, or use TimeSlicing")
        path = Path(entry.cdi_spec) if entry.cdi_spec else cdi.spec_path(self.cdi_root, self.driver_name, ref.uid)
        spec = self._spec(ref, entry.devices)
        if not cdi.spec_is_current(path, spec):
            log.warning("claim %s (uid %s): its CDI spec %s was missing or changed: written again", ref, ref.uid, path)
            self._write_spec(ref, path, entry.devices)
        return entry.devices

    def _mig_present(self, mig: MigInstance) -> bool:
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        if not self.backend.mig_mode(h).current:
            return False
        placement = Placement(mig.placement_start, mig.placement_size)
        return any(d.uuid == mig.uuid and d.profile_id == mig.profile_id and d.placement == placement
                   and d.gpu_instance_id == mig.gpu_instance_id and d.compute_instance_id == mig.compute_instance_id
                   for d in self.backend.mig_devices(h))

    def _recreate_mig(self, cp: Checkpoint, ref: ClaimRef, entry: PreparedClaim, d: PreparedDevice) -> None:
        mig = d.mig
        assert mig is not None
        what = (f"claim {ref}: its MIG device {d.device} ({mig.uuid or 'unnamed'}, profile {mig.profile_id} at "
                f"{mig.placement_start}:{mig.placement_size}) no longer exists on GPU {mig.gpu_uuid}")
        if d.admin_access:           # admin access never creates: use the instance there now, if any
            dev = self._devices.get(d.device)
            if dev is None or dev.profile is None:
                raise PrepareError(f"{what}, and this node no longer publishes that device; delete the claim so it "
                                   "is allocated again")
            d.mig = self._existing_mig(ref, dev, self.backend.device_by_uuid(mig.gpu_uuid))
            self.checkpoint.write(cp)
            return
        if not mig.created:
            raise PrepareError(f"{what}; it was created outside Partita (static MIG), so Partita does not re-create "
                               "it — re-create it with nvidia-smi, or delete the claim so it is allocated again")
        dev = self._devices.get(d.device)
        if dev is None or dev.profile is None:
            raise PrepareError(f"{what}, and this node no longer publishes that device; delete the claim so it is "
                               "allocated again")
        log.warning("%s: re-creating it", what)
        # Intent first: from here the instance is matched by profile and placement only.
        mig.gpu_instance_id = mig.compute_instance_id = mig.uuid = None
        self.checkpoint.write(cp)
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        try:
            self._create_mig(cp, ref, dev, h, mig, adopt=True)
        except (NvmlError, PrepareError) as e:
            raise PrepareError(f"{what} and cannot be re-created: {e}; delete the claim (and its pod) so it is "
                               "allocated again") from None
        self._write_spec(ref, Path(entry.cdi_spec) if entry.cdi_spec else
                         cdi.spec_path(self.cdi_root, self.driver_name, ref.uid), entry.devices)

    def _prepare_device(self, cp: Checkpoint, entry: PreparedClaim, ref: ClaimRef, result: dict, dev: DeviceRef,
                        config: GpuConfig | None) -> PreparedDevice:
        h = self.backend.device_by_uuid(dev.gpu.uuid)
        mig: MigInstance | None = None
        edits = None
        admin = is_admin(result)
        if admin:                    # monitoring: changes nothing on the device
            config = None
            if dev.type == C.DEVICE_TYPE_MIG:
                mig = self._existing_mig(ref, dev, h)
        elif dev.type == C.DEVICE_TYPE_MIG:
            mig = self._prepare_mig(cp, entry, ref, dev, h)
        else:
            self._leave_mig_mode(dev, h)
            if uses_sharing(dev.type, config):
                e = self.sharing.prepare(cp, str(ref), ref.uid, dev.gpu.uuid, h, config,
                                         result.get("consumedCapacity"), pending=entry.devices)
                self._crash("share-set-up")
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
                              consumedCapacity=result.get("consumedCapacity"), edits=edits,
                              adminAccess=True if admin else None)

    def _leave_mig_mode(self, dev: DeviceRef, h: Any) -> None:
        """A Hopper GPU left in MIG mode by earlier MIG claims returns to whole use."""
        if not dev.gpu.mig_capable or dev.gpu.architecture not in MIG_MODE_WITHOUT_RESET:
            return
        if self.backend.mig_mode(h).current:
            if self.backend.gpu_instances(h):
                raise PrepareError(f"GPU {dev.gpu.uuid} still has MIG instances; it cannot be used as "
                                   f"{dev.type} device {dev.name} until they are gone")
            self.backend.set_mig_mode(h, False)
            log.info("disabled MIG mode on GPU %s for %s use", dev.gpu.uuid, dev.type)

    def _found_mig(self, dev: DeviceRef, h: Any) -> MigInstance | None:
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

    def _existing_mig(self, ref: ClaimRef, dev: DeviceRef, h: Any) -> MigInstance:
        """Admin access to a MIG device: the instance that exists at its placement now, never a new one; else an
        error naming the device."""
        found = self._found_mig(dev, h)
        if found is not None:
            return found
        assert dev.profile is not None and dev.placement_start is not None
        raise PrepareError(f"claim {ref}: admin access to MIG device {dev.name} needs that MIG device to exist, and "
                           f"GPU {dev.gpu.uuid} has no {dev.profile.name} instance at placement {dev.placement_start}:"
                           f"{dev.profile.memory_slices}; admin access never changes a device (no MIG mode change or "
                           "instance creation) — prepare it for a workload claim first, or create it with nvidia-smi, "
                           "then the kubelet retries")

    def _prepare_mig(self, cp: Checkpoint, entry: PreparedClaim, ref: ClaimRef, dev: DeviceRef, h: Any) -> MigInstance:
        found = self._found_mig(dev, h)
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
        self._create_mig(cp, ref, dev, h, mig)
        return mig

    def _create_mig(self, cp: Checkpoint, ref: ClaimRef, dev: DeviceRef, h: Any, mig: MigInstance, *,
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
                 and not self._held_by_other(cp, ref.uid, mig.gpu_uuid, g.id, placement)]
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

    @staticmethod
    def _held_by_other(cp: Checkpoint, uid: str, gpu_uuid: str, gi_id: int, placement: Placement) -> bool:
        """Another claim in the checkpoint records this GPU instance as its own."""
        return any(d.mig is not None and d.mig.gpu_uuid == gpu_uuid and d.mig.gpu_instance_id == gi_id
                   and Placement(d.mig.placement_start, d.mig.placement_size) == placement
                   for c in cp.claims.values() if c.uid != uid for d in c.devices if not d.admin_access)

    def _undo(self, cp: Checkpoint, entry: PreparedClaim) -> list[str]:
        """Destroy what a (possibly interrupted) prepare of this claim created; every device is tried."""
        errors: list[str] = []
        for d in entry.devices:
            if d.mig is not None and d.mig.created:
                errors += self._try(self._destroy_mig, cp, entry.uid, d.mig)
        return errors

    def _destroy_mig(self, cp: Checkpoint, uid: str, mig: MigInstance) -> None:
        h = self.backend.device_by_uuid(mig.gpu_uuid)
        if not self.backend.mig_mode(h).current:
            return
        placement = Placement(mig.placement_start, mig.placement_size)
        for gi in self.backend.gpu_instances(h):
            # Profile and placement always match: after a crash between a destroy and the checkpoint, a
            # recorded instance id may since have been reused by another claim's instance elsewhere.
            if gi.profile_id == mig.profile_id and gi.placement == placement and (
                    mig.gpu_instance_id is None or gi.id == mig.gpu_instance_id) \
                    and not self._held_by_other(cp, uid, mig.gpu_uuid, gi.id, placement):
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
            if d.admin_access:
                env.append("PARTITA_ADMIN_ACCESS=true")
            extra = cdi.ContainerEdits.model_validate(d.edits or {})
            name = d.cdi_device_ids[0].split("=", 1)[1]
            cdi_devices.append(cdi.CdiDevice(name=name, containerEdits=cdi.ContainerEdits(
                env=env + (extra.env or []), mounts=extra.mounts)))
        common = [f"PARTITA_CLAIM={ref.namespace}/{ref.name}", f"PARTITA_CLAIM_UID={ref.uid}",
                  f"PARTITA_NODE={self.node_name}"]
        return cdi.build_spec(self.driver_name, cdi_devices, common)

    # -- unprepare ------------------------------------------------------------------------------
    async def unprepare(self, claims: list[ClaimRef]) -> dict[str, str]:
        """Error string per claim UID ("" = done). Unknown claims are success. Each claim is recorded
        ``Unpreparing`` before anything is destroyed or removed, so a crash midway is finished later."""
        out: dict[str, str] = {}
        async with self._checkpoint_session() as cp:
            if isinstance(cp, CheckpointError):
                return {ref.uid: str(cp) for ref in claims}
            done: list[ClaimRef] = []
            todo: list[tuple[ClaimRef, PreparedClaim]] = []
            for ref in claims:
                if not ref.uid:
                    out[ref.uid] = (f"the kubelet sent a claim with an empty uid ({ref.namespace}/{ref.name}); "
                                    "nothing to unprepare")
                    continue
                entry = cp.claims.get(ref.uid)
                if entry is None:
                    out[ref.uid] = ""
                    continue
                todo.append((ref, entry))
            marked = [entry for _, entry in todo if entry.state == "Prepared"]
            if marked:                     # the intent of every claim of the call, in one write
                for entry in marked:
                    entry.state = "Unpreparing"
                try:
                    self.checkpoint.write(cp)
                except CheckpointError as e:
                    for entry in marked:
                        entry.state = "Prepared"
                    for ref, _ in todo:
                        out[ref.uid] = f"claim {ref}: nothing was unprepared: {e}; the kubelet retries"
                    todo = []
                else:
                    self._crash("unprepare-recorded")
            for ref, entry in todo:
                errors = self._release(cp, entry)
                if errors:
                    out[ref.uid] = f"claim {ref}: {'; '.join(errors)}; the kubelet retries"
                    continue
                del cp.claims[ref.uid]
                done.append(ref)
            if done:
                try:
                    self.checkpoint.write(cp)
                except CheckpointError as e:     # all is released; the claims stay Unpreparing until recorded
                    for ref in done:
                        out[ref.uid] = f"claim {ref}: its devices are released but {e}; the kubelet retries"
                    done = []
            for ref in done:
                out[ref.uid] = ""
                log.info("unprepared claim %s (uid %s)", ref, ref.uid)
            self.prepared_count = len(cp.claims)
        return out

    def _release(self, cp: Checkpoint, entry: PreparedClaim) -> list[str]:
        """Everything a claim (prepared, or interrupted while preparing or unpreparing) holds on the node:
        its MIG instances, MIG mode it needed, its CDI spec, its shares. Every step runs; returns what
        failed (idempotent, so a retry finishes it)."""
        errors = self._undo(cp, entry)
        errors += self._try(self._maybe_leave_mig, entry)
        errors += self._try(self._remove_spec, Path(entry.cdi_spec) if entry.cdi_spec else
                            cdi.spec_path(self.cdi_root, self.driver_name, entry.uid))
        self._crash("cdi-spec-removed")
        shared = sorted({d.gpu_uuid for d in entry.devices if holds_share(d)})
        if shared:
            held = cp.claims.pop(entry.uid, None)     # the shares left on each GPU, without this claim's
            for uuid in shared:
                errors += self._try(self.sharing.release_unused, cp, [uuid])
            if held is not None:
                cp.claims[entry.uid] = held
        return errors

    def _maybe_leave_mig(self, entry: PreparedClaim) -> None:
        """After the last Partita-created MIG device of a Hopper GPU goes, return it to whole use."""
        for d in entry.devices:
            if d.mig is None or not d.mig.created:
                continue
            gpu = next((g for g in self.inventory.gpus if g.uuid == d.gpu_uuid), None)
            if gpu is None or gpu.architecture not in MIG_MODE_WITHOUT_RESET:
                continue
            h = self.backend.device_by_uuid(d.gpu_uuid)
            if self.backend.mig_mode(h).current and not self.backend.gpu_instances(h):
                self.backend.set_mig_mode(h, False)
                log.info("disabled MIG mode on GPU %s: its last MIG device is gone", d.gpu_uuid)
                self._crash("mig-mode-disabled")

    # -- start-up recovery ----------------------------------------------------------------------
    async def recover(self) -> list[str]:
        """Undo prepares and finish unprepares a crash interrupted; after a node reboot, restore what
        prepared claims had (MIG instances, CDI specs; each claim's next prepare verifies it again) — the
        session does both (:meth:`_finish_interrupted`). Returns the UIDs of the interrupted claims that
        were finished."""
        try:
            before = {uid for uid, c in self.checkpoint.read().claims.items() if c.state != "Prepared"}
        except CheckpointError:
            before = set()
        async with self._checkpoint_session() as cp:
            if isinstance(cp, CheckpointError):
                return []
            self.sharing.reconcile(cp)
            self.prepared_count = len(cp.claims)
            return sorted(before - set(cp.claims))

    def _crash(self, point: str) -> None:
        crash_point(point, self.backend.kind)

    def prepared_claims(self) -> dict[str, PreparedClaim]:
        return self.checkpoint.read().claims
