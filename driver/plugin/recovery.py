"""Finishing what a crash, a failed write or a node reboot interrupted, at the start of every checkpoint
session (:meth:`Recovery.finish_interrupted`) and at plugin start (:meth:`Recovery.remove_orphans`).

* A claim recorded ``Preparing`` is undone, one recorded ``Unpreparing`` is finished (its release runs
  again: idempotent); an entry that cannot be finished now stays, logged, for the next session.
* Temp files of writes a kill interrupted are removed, in the process's first session (a kill of another
  instance sharing the directories, in a rolling update, leaves at most one per directory until the next
  start: hidden ``.*.tmp`` names, which container runtimes do not read as CDI specs).
* A new boot id (a reboot took MIG instances, CDI specs under /var/run and MPS daemons) makes every prepared
  claim be restored (``verify``) before the new boot id is recorded, so a crash meanwhile restores again.
* At start: CDI specs no recorded claim has, MPS daemons and GPU sharing settings no recorded share uses are
  removed — what a crash between a batch's side effects and its record left. Every write happens under the
  session's lock, so nothing else is in flight.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from driver.inventory import Gpu
from driver.nvml import NvmlError
from driver.plugin import boot, cdi, durable
from driver.plugin.checkpoint import Checkpoint, CheckpointStore, PreparedClaim
from driver.plugin.claimref import ClaimRef, PrepareError
from driver.plugin.release import ClaimSpecs, Release, try_step
from driver.plugin.sharing import Sharing, SharingError

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, *, release: Release, specs: ClaimSpecs, sharing: Sharing, checkpoint: CheckpointStore,
                 plugin_dir: Path, boot_id_file: Path, gpus: Callable[[], list[Gpu]],
                 verify: Callable[[Checkpoint, ClaimRef, PreparedClaim], Any]):
        self.release = release
        self.specs = specs
        self.sharing = sharing
        self.checkpoint = checkpoint
        self.plugin_dir = plugin_dir
        self.boot_id_file = boot_id_file
        self._gpus = gpus
        self._verify = verify
        self._temps_removed = False

    def _remove_temps(self) -> None:
        """Temp files of writes a kill interrupted (all writes happen under the file lock the session holds).
        Once per process, in its first session: only a killed process leaves them (a failed write removes its
        own), and listing the directories each time costs more than a prepare (an ext4 directory that held
        many files stays as large)."""
        root = self.specs.cdi_root
        for p in durable.remove_stale_temps(self.plugin_dir, durable.temp_name_of(self.checkpoint.path)) + \
                durable.remove_stale_temps(root, durable.temp_name_of(cdi.spec_path(root, self.specs.driver_name, "*"))):
            log.info("removed %s, left by an interrupted write", p)
        self._temps_removed = True

    def finish_interrupted(self, cp: Checkpoint) -> list[str]:
        """Undo interrupted prepares, finish interrupted unprepares, record the boot id; the UIDs finished."""
        finished: list[str] = []
        if not self._temps_removed:
            self._remove_temps()
        current = boot.read_boot_id(self.boot_id_file)
        rebooted_from = None
        changed = False
        if current is not None and cp.boot_id != current:
            if cp.boot_id is None:
                cp.boot_id = current
                changed = True
            else:
                rebooted_from = cp.boot_id
        for uid, entry in list(cp.claims.items()):
            if entry.state == "Prepared":
                continue
            what = "prepare" if entry.state == "Preparing" else "unprepare"
            errors = self.release.release(cp, entry)
            if errors:
                log.error("could not finish the interrupted %s of claim %s/%s (uid %s): %s", what, entry.namespace,
                          entry.name, uid, "; ".join(errors))
                continue
            del cp.claims[uid]
            finished.append(uid)
            log.warning("%s the interrupted %s of claim %s/%s (uid %s)", "undid" if what == "prepare" else "finished",
                        what, entry.namespace, entry.name, uid)
        if rebooted_from is not None:
            self._restore_after_reboot(cp, rebooted_from, current)
        if changed or finished or rebooted_from is not None:
            self.checkpoint.write(cp)
        return finished

    def _restore_after_reboot(self, cp: Checkpoint, old: str, current: str | None) -> None:
        log.warning("the node rebooted (boot id %s, checkpoint written under %s): restoring the MIG instances, "
                    "CDI specs and MPS daemons of %d prepared claim(s)", current, old,
                    sum(1 for c in cp.claims.values() if c.state == "Prepared"))
        for uid, entry in list(cp.claims.items()):
            if entry.state != "Prepared":
                continue
            ref = ClaimRef(entry.namespace, entry.name, uid)
            try:
                self._verify(cp, ref, entry)
            except (PrepareError, NvmlError, SharingError) as e:
                log.error("after the reboot, claim %s (uid %s) could not be restored: %s; its next prepare "
                          "tries again", ref, uid, e)
        cp.boot_id = current

    def remove_orphans(self, cp: Checkpoint) -> None:
        """What a crash before a batch's record left of claims never recorded (see the module doc)."""
        recorded = {self.specs.path(uid, e) for uid, e in cp.claims.items()}
        for path in self.specs.all_files():
            if path not in recorded:
                log.warning("removing CDI spec %s: no claim in the checkpoint has it (an interrupted prepare)", path)
                for e in try_step(cdi.remove_spec, path):
                    log.error("%s", e)
        self.sharing.reconcile(cp)
        for e in try_step(self.sharing.restore_unshared, cp, [g.uuid for g in self._gpus()]):
            log.error("%s", e)
