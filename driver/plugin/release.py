"""What a claim holds on the node, and giving it back: its CDI spec file (:class:`ClaimSpecs`), and the
release of everything a prepared, interrupted or failed claim has — MIG devices, the MIG mode they needed,
its spec, its shares (:class:`Release`). Every step runs even when one fails; each returns what failed,
and all are idempotent, so a retry finishes what is left."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from driver.inventory import Gpu
from driver.nvml import NvmlError
from driver.plugin import cdi, durable
from driver.plugin.checkpoint import Checkpoint, CheckpointError, CheckpointStore, PreparedClaim, PreparedDevice
from driver.plugin.claimref import ClaimRef, PrepareError
from driver.plugin.mig import MigDevices
from driver.plugin.mps import MpsError
from driver.plugin.sharing import Sharing, SharingError, holds_share

log = logging.getLogger(__name__)

_STEP_ERRORS = (NvmlError, CheckpointError, SharingError, MpsError, PrepareError, OSError)


def try_step(step: Callable[..., Any], *args: Any) -> list[str]:
    """Run one step of an undo or release; what failed (nothing: [])."""
    try:
        step(*args)
    except durable.DurableError as e:
        return [e.strerror]
    except _STEP_ERRORS as e:
        return [str(e)]
    return []


@dataclass
class Staged:
    """A claim of a batch, prepared on the node and held ``Preparing`` until the batch's write."""
    ref: ClaimRef
    entry: PreparedClaim
    shared_gpus: list[str]


class ClaimSpecs:
    """The CDI spec file of each claim (:mod:`driver.plugin.cdi` says what it holds)."""

    def __init__(self, cdi_root: Path, driver_name: str, node_name: str):
        self.cdi_root = cdi_root
        self.driver_name = driver_name
        self.node_name = node_name

    def path(self, uid: str, entry: PreparedClaim | None = None) -> Path:
        return Path(entry.cdi_spec) if entry is not None and entry.cdi_spec else \
            cdi.spec_path(self.cdi_root, self.driver_name, uid)

    def spec(self, ref: ClaimRef, devices: list[PreparedDevice]) -> cdi.CdiSpec:
        return cdi.claim_spec(self.driver_name, self.node_name, ref.namespace, ref.name, ref.uid, devices)

    def write(self, ref: ClaimRef, entry: PreparedClaim) -> None:
        try:
            cdi.write_spec(self.path(ref.uid, entry), self.spec(ref, entry.devices))
        except durable.DurableError as e:
            raise PrepareError(f"claim {ref}: {e.strerror}") from None

    def is_current(self, ref: ClaimRef, entry: PreparedClaim) -> bool:
        return cdi.spec_is_current(self.path(ref.uid, entry), self.spec(ref, entry.devices))

    def remove(self, entry: PreparedClaim) -> None:
        """Only when there is one: removing a missing file from a read-only directory is an error too."""
        path = self.path(entry.uid, entry)
        if path.exists() or path.is_symlink():
            cdi.remove_spec(path)

    def all_files(self) -> list[Path]:
        """Every spec file of this driver in the CDI directory."""
        return sorted(self.cdi_root.glob(cdi.spec_path(self.cdi_root, self.driver_name, "*").name))


class Release:
    def __init__(self, *, mig: MigDevices, sharing: Sharing, specs: ClaimSpecs, checkpoint: CheckpointStore,
                 gpus: Callable[[], list[Gpu]], crash: Callable[[str], None]):
        self.mig = mig
        self.sharing = sharing
        self.specs = specs
        self.checkpoint = checkpoint
        self._gpus = gpus
        self._crash = crash

    def undo(self, cp: Checkpoint, entry: PreparedClaim) -> list[str]:
        """Destroy what a (possibly interrupted) prepare of this claim created; every device is tried."""
        errors: list[str] = []
        for d in entry.devices:
            if d.mig is not None and d.mig.created:
                errors += try_step(self.mig.destroy, cp, entry.uid, d.mig)
        return errors

    def release(self, cp: Checkpoint, entry: PreparedClaim) -> list[str]:
        """Everything a claim (prepared, or interrupted while preparing or unpreparing) holds on the node:
        its MIG instances, MIG mode it needed, its CDI spec, its shares."""
        errors = self.undo(cp, entry)
        errors += try_step(self.mig.leave_mode_if_unused, entry, self._gpus())
        errors += try_step(self.specs.remove, entry)
        self._crash("cdi-spec-removed")
        shared = sorted({d.gpu_uuid for d in entry.devices if holds_share(d)})
        if shared:
            held = cp.claims.pop(entry.uid, None)     # the shares left on each GPU, without this claim's
            for uuid in shared:
                errors += try_step(self.sharing.release_unused, cp, [uuid])
            if held is not None:
                cp.claims[entry.uid] = held
        return errors

    def rollback(self, cp: Checkpoint, claims: list[Staged], *, persisted: bool) -> dict[str, list[str]]:
        """Undo failed prepares; what failed, per claim UID. The claims leave the checkpoint first, so the shares
        left on each GPU are the others'; a claim whose undo failed is kept ``Preparing`` (the next call finishes
        it). ``persisted``: a write may have recorded some of them, so the checkpoint is written again."""
        for s in claims:
            cp.claims.pop(s.ref.uid, None)
        errors = {s.ref.uid: self.undo(cp, s.entry) + try_step(self.mig.leave_mode_if_unused, s.entry, self._gpus())
                  + try_step(self.specs.remove, s.entry) for s in claims}
        for uuid in sorted({g for s in claims for g in s.shared_gpus}):
            failed = try_step(self.sharing.release_unused, cp, [uuid])
            for s in claims:
                if uuid in s.shared_gpus:
                    errors[s.ref.uid] += failed
        for s in claims:
            if errors[s.ref.uid]:
                s.entry.state = "Preparing"
                cp.claims[s.ref.uid] = s.entry
        if persisted or any(errors.values()):
            failed = try_step(self.checkpoint.write, cp)
            for s in claims:
                errors[s.ref.uid] += failed
        return errors
