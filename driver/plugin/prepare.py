"""Prepare and unprepare claims on this node (docs/architecture.md §5): the orchestration.

For each claim the kubelet names: check the claim read from the API server (uid, allocation, node), take
our driver's results, resolve each device (:mod:`driver.plugin.devices`), admit it next to what is prepared
(:mod:`driver.plugin.admission`), take the opaque configs (:mod:`driver.plugin.config`), set each device up
(:mod:`driver.plugin.devicesetup`: whole GPU, MIG device (:mod:`driver.plugin.mig`) or share
(:mod:`driver.plugin.sharing`)), then the claim's CDI spec (:mod:`driver.plugin.cdi`) and its checkpoint
record. Prepare and unprepare are idempotent; a failed prepare undoes what it did (every undo step, even
when one fails, reporting all that failed), so the node stays as it was.

Group commit (:mod:`driver.plugin.groupcommit`): concurrent calls run as one batch in a worker thread, in
one checkpoint session (:mod:`driver.plugin.session`). A batch's new claims are prepared one after the
other, each held ``Preparing`` in the checkpoint until all are done, then recorded ``Prepared`` in one
write; only then is any of them answered. If that write fails, every claim of the batch is undone and
answered the error. A crash before the write leaves nothing recorded ``Prepared`` (whatever an earlier write
of the batch recorded ``Preparing`` is undone by the next call); a crash after it leaves the claims
prepared, and the kubelet's retry finds them so. Unprepares of a batch (:mod:`driver.plugin.unprepare`) are
recorded ``Unpreparing`` in one write before anything is destroyed, and removed in one write after.

Crash safety: every session (and :meth:`DeviceState.recover` at start) first undoes interrupted prepares
and finishes interrupted unprepares (:mod:`driver.plugin.recovery`), so no MIG instance or CDI spec is
orphaned and no claim is answered from a stale entry. Preparing an already prepared claim verifies its MIG
instances, MPS daemons and CDI spec still exist (:meth:`DeviceSetup.verify`: re-creating them, or failing
with what is missing); a node reboot (a new boot id) makes the start-up recovery restore them for every
prepared claim.

Admin access (a result with ``adminAccess: true``) changes nothing on the device (see
:mod:`driver.plugin.devicesetup`); its unprepare destroys nothing. Its CDI device has
``PARTITA_ADMIN_ACCESS=true``.

What follows a prepare or an unprepare (claim status, usage, the kubelet's health stream) is called by the
gRPC layer (server.py: the claim observers and ``on_change``), which also holds the claim read for it.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Mapping

from driver.api.nodeselector import NodeFacts
from driver.inventory import Inventory
from driver.nvml import NvmlBackend, NvmlError
from driver.plugin import boot
from driver.plugin.admission import AdmissionError, admit, is_admin
from driver.plugin.checkpoint import Checkpoint, CheckpointError, CheckpointStore, PreparedClaim, PreparedDevice
from driver.plugin.claimref import ClaimRef, PreparedResult, PrepareError, base_request, check_request
from driver.plugin.devicesetup import DeviceSetup
from driver.plugin.claims import our_results
from driver.plugin.config import ConfigError, effective_configs
from driver.plugin.devices import DeviceRef, device_index
from driver.plugin.faults import crash_point
from driver.plugin.groupcommit import GroupCommit
from driver.plugin.mig import MigDevices
from driver.plugin.mps import MpsDaemons
from driver.plugin.recovery import Recovery
from driver.plugin.release import ClaimSpecs, Release, Staged
from driver.plugin.session import Sessions
from driver.plugin.sharing import Sharing, SharingError, uses_sharing
from driver.plugin.unprepare import unprepare_batch

__all__ = ["ClaimRef", "DeviceState", "PrepareError", "PreparedResult", "base_request", "check_request"]

log = logging.getLogger(__name__)

_CLAIM_ERRORS = (PrepareError, AdmissionError, ConfigError, SharingError)


class DeviceState:
    """All claim preparation on this node. One per plugin process; state lives in the checkpoint.
    ``cdi_search_dirs``: where the NVIDIA container toolkit's CDI spec is looked for (``main.py`` sets it on
    real nodes; none: no lookup)."""

    def __init__(self, *, driver_name: str, node_name: str, backend: NvmlBackend, inventory: Inventory,
                 cdi_root: Path, plugin_dir: Path, cdi_search_dirs: Iterable[Path] | None = None,
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
        self.prepared_count = 0
        self.sharing = Sharing(backend, MpsDaemons(plugin_dir / "mps", backend.kind))
        self.mig = MigDevices(backend, self.checkpoint, node_name, lambda point: self._crash(point))
        self.specs = ClaimSpecs(cdi_root, driver_name, node_name)
        self.setup = DeviceSetup(driver_name=driver_name, backend=backend, mig=self.mig, sharing=self.sharing,
                                 specs=self.specs, toolkit_dirs=cdi_search_dirs or [], devices=lambda: self._devices,
                                 crash=lambda point: self._crash(point))
        self.release = Release(mig=self.mig, sharing=self.sharing, specs=self.specs, checkpoint=self.checkpoint,
                               gpus=lambda: self.inventory.gpus, crash=lambda point: self._crash(point))
        self.recovery = Recovery(release=self.release, specs=self.specs, sharing=self.sharing,
                                 checkpoint=self.checkpoint, plugin_dir=plugin_dir, boot_id_file=self.boot_id_file,
                                 gpus=lambda: self.inventory.gpus, verify=lambda *a: self.setup.verify(*a))
        self.sessions = Sessions(self.checkpoint, plugin_dir, cdi_root, self.recovery.finish_interrupted)
        self.commits: GroupCommit[tuple[str, Any], Any] = GroupCommit(self._run_batch)
        self.set_inventory(inventory)

    def set_inventory(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._devices = device_index(inventory)

    @property
    def devices(self) -> Mapping[str, DeviceRef]:
        """Every device name this node can publish -> what it is (:func:`device_index` of the inventory)."""
        return self._devices

    # -- the calls ------------------------------------------------------------------------------
    async def prepare(self, claims: list[tuple[ClaimRef, dict]]) -> dict[str, PreparedResult]:
        """``claims``: each kubelet claim with the ResourceClaim read from the API server (the caller answers
        claims that could not be read). Returns one result per claim UID, once the batch it ran in is durable."""
        return await self.commits.submit(("prepare", claims))

    def arriving(self) -> contextlib.AbstractContextManager[None]:
        """Around reading the claims of a prepare call: a batch about to start waits for them
        (:meth:`GroupCommit.arriving`)."""
        return self.commits.arriving()

    async def unprepare(self, claims: list[ClaimRef]) -> dict[str, str]:
        """Error string per claim UID ("" = done). Unknown claims are success."""
        return await self.commits.submit(("unprepare", claims))

    async def recover(self) -> list[str]:
        """Undo prepares and finish unprepares a crash interrupted; after a node reboot, restore what
        prepared claims had. Returns the UIDs of the interrupted claims that were finished."""
        return await self.commits.submit(("recover", None))

    def _run_batch(self, items: list[tuple[str, Any]]) -> list[Any]:
        """One session for the batch: consecutive items of one kind run together (worker thread)."""
        answers: list[Any] = []
        with self.sessions.open() as cp:
            for kind, group in itertools.groupby(items, key=lambda item: item[0]):
                payloads = [p for _, p in group]
                if kind == "recover":
                    if not isinstance(cp, CheckpointError):
                        self.recovery.remove_orphans(cp)
                    answers += [sorted(self.sessions.finished)] * len(payloads)
                elif kind == "prepare":
                    claims = [c for p in payloads for c in p]
                    res = ({ref.uid: PreparedResult(error=str(cp)) for ref, _ in claims}
                           if isinstance(cp, CheckpointError) else self._prepare_batch(cp, claims))
                    answers += [{ref.uid: res[ref.uid] for ref, _ in p} for p in payloads]
                else:
                    refs = [r for p in payloads for r in p]
                    errs = {r.uid: str(cp) for r in refs} if isinstance(cp, CheckpointError) \
                        else unprepare_batch(cp, refs, checkpoint=self.checkpoint, release=self.release,
                                             crash=self._crash)
                    answers += [{r.uid: errs[r.uid] for r in p} for p in payloads]
            if not isinstance(cp, CheckpointError):
                self.prepared_count = len(cp.claims)
        return answers

    # -- prepare --------------------------------------------------------------------------------
    def _prepare_batch(self, cp: Checkpoint, claims: list[tuple[ClaimRef, dict | Exception]]) -> dict[str, PreparedResult]:
        out: dict[str, PreparedResult] = {}
        staged: dict[str, Staged] = {}
        writes = self.checkpoint.writes
        for ref, claim in claims:
            if ref.uid in out:              # the same claim twice in the batch: one prepare, one answer
                continue
            try:
                if isinstance(claim, Exception):
                    raise claim
                out[ref.uid] = PreparedResult(devices=self._prepare_one(cp, ref, claim, staged))
            except _CLAIM_ERRORS as e:
                out[ref.uid] = PreparedResult(error=str(e))
            except (NvmlError, CheckpointError) as e:
                out[ref.uid] = PreparedResult(error=f"claim {ref}: {e}")
            except Exception as e:  # noqa: BLE001 - a bug must not take the plugin down
                log.exception("prepare of claim %s (uid %s) failed unexpectedly", ref, ref.uid)
                out[ref.uid] = PreparedResult(error=f"claim {ref}: internal error: {e}")
            if out[ref.uid].error:
                log.warning("prepare of claim %s (uid %s) failed: %s", ref, ref.uid, out[ref.uid].error)
        if staged:
            self._commit(cp, staged, out, persisted=self.checkpoint.writes > writes)
        return out

    def _commit(self, cp: Checkpoint, staged: dict[str, Staged], out: dict[str, PreparedResult], *,
                persisted: bool) -> None:
        """The batch's one write; on failure every staged claim is undone and answered the error."""
        for s in staged.values():
            s.entry.state = "Prepared"
        try:
            self.checkpoint.write(cp)
        except CheckpointError as e:
            undo = self.release.rollback(cp, list(staged.values()), persisted=persisted)
            for uid, s in staged.items():
                also = f"; undoing it also failed (retried by the next call): {'; '.join(undo[uid])}" if undo[uid] else ""
                out[uid] = PreparedResult(error=f"claim {s.ref}: nothing was prepared: {e}{also}; the kubelet retries")
                log.warning("prepare of claim %s (uid %s) failed: %s", s.ref, uid, out[uid].error)
            return
        self._crash("claim-prepared")
        for s in staged.values():
            log.info("prepared claim %s (uid %s): %s", s.ref, s.ref.uid,
                     ", ".join(d.device for d in s.entry.devices) or "no devices")

    def _prepare_one(self, cp: Checkpoint, ref: ClaimRef, claim: dict, staged: dict[str, Staged]) -> list[PreparedDevice]:
        results = our_results(ref, claim, self.driver_name, NodeFacts(self.node_name, self.node_labels))
        existing = cp.claims.get(ref.uid)
        if existing is not None and existing.state == "Prepared":
            # Idempotent: the kubelet asks again after its own restart. What the claim had must still be
            # there (a reboot or a crash may have taken it): re-created, or a clear error.
            return self.setup.verify(cp, ref, existing)
        # The device model, whatever the allocation says: this node, one use per GPU, shares that fit.
        refs = [(r, self._devices.get(r.get("device", ""))) for r in results]
        admit(_on_gpus(cp.claims, {d.gpu.uuid for _, d in refs if d is not None}), ref, results, self._devices)
        if existing is not None:      # an interrupted prepare or unprepare the session could not finish
            errors = self.release.release(cp, existing)
            if errors:
                raise PrepareError(f"claim {ref}: its interrupted {existing.state.lower()} cannot be finished: "
                                   f"{'; '.join(errors)}")
            del cp.claims[ref.uid]
            self.checkpoint.write(cp)
        for r, dev in refs:
            if dev is None:
                raise PrepareError(f"claim {ref}: status.allocation.devices.results names device "
                                   f"{r.get('device')!r} in pool {r.get('pool')}, which this node does not publish "
                                   f"(known: {len(self._devices)} devices); the allocation is stale or corrupt — "
                                   "delete the claim so it is allocated again")
        configs = effective_configs(claim, self.driver_name, results)
        entry = PreparedClaim(uid=ref.uid, namespace=ref.namespace, name=ref.name, state="Preparing",
                              cdiSpec=str(self.specs.path(ref.uid)))
        shared = [dev.gpu.uuid for (r, dev), config in zip(refs, configs)
                  if uses_sharing(dev.type, config) and not is_admin(r)]
        devices: list[PreparedDevice] = []
        try:
            for (r, dev), config in zip(refs, configs):
                devices.append(self.setup.prepare(cp, entry, ref, r, dev, config))
                # entry.devices may hold a placeholder for a MIG device being created: now it is done
                entry.devices = list(devices)
            self.specs.write(ref, entry)
            self._crash("cdi-spec-written")
        except BaseException as e:
            errors = self.release.rollback(cp, [Staged(ref, entry, shared)], persisted=ref.uid in cp.claims)[ref.uid]
            if not errors or not isinstance(e, Exception):
                raise
            first = str(e) if isinstance(e, _CLAIM_ERRORS) else f"claim {ref}: {e}"
            raise PrepareError(f"{first}; undoing the prepare also failed (retried by the next call): "
                               f"{'; '.join(errors)}") from None
        cp.claims[ref.uid] = entry          # Preparing until the batch's write (_commit)
        staged[ref.uid] = Staged(ref, entry, shared)
        return devices

    def _crash(self, point: str) -> None:
        crash_point(point, self.backend.kind)

    def prepared_claims(self) -> dict[str, PreparedClaim]:
        return self.checkpoint.read().claims


def _on_gpus(claims: Mapping[str, PreparedClaim], gpus: set[str]) -> dict[str, PreparedClaim]:
    """The claims with a device on one of ``gpus``: all that admission compares with (uses conflict per GPU)."""
    return {uid: c for uid, c in claims.items() if any(d.gpu_uuid in gpus for d in c.devices)}
