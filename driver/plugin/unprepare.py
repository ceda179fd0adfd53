"""Unprepare of a batch of claims (:mod:`driver.plugin.groupcommit`), in the batch's checkpoint session.

Every claim of the batch that is prepared is recorded ``Unpreparing`` in one write before anything is
destroyed or removed, so a crash midway is finished later (:mod:`driver.plugin.recovery`); then each is
released (:class:`driver.plugin.release.Release`: MIG devices, MIG mode, CDI spec, shares) and all that were
released leave the checkpoint in one write. A claim the checkpoint does not know is done (unprepare is
idempotent); one whose release failed stays, and the kubelet retries.
"""

from __future__ import annotations

import logging
from typing import Callable

from driver.plugin.checkpoint import Checkpoint, CheckpointError, CheckpointStore, PreparedClaim
from driver.plugin.claimref import ClaimRef
from driver.plugin.release import Release

log = logging.getLogger(__name__)


def unprepare_batch(cp: Checkpoint, claims: list[ClaimRef], *, checkpoint: CheckpointStore, release: Release,
                    crash: Callable[[str], None]) -> dict[str, str]:
    """Error string per claim UID ("" = done)."""
    out: dict[str, str] = {}
    todo: dict[str, tuple[ClaimRef, PreparedClaim]] = {}
    for ref in claims:
        if not ref.uid:
            out[ref.uid] = (f"the kubelet sent a claim with an empty uid ({ref.namespace}/{ref.name}); "
                            "nothing to unprepare")
            continue
        entry = cp.claims.get(ref.uid)
        if entry is None:
            out[ref.uid] = ""
        else:
            todo[ref.uid] = (ref, entry)
    marked = [entry for _, entry in todo.values() if entry.state == "Prepared"]
    if marked:                     # the intent of every claim of the batch, in one write
        for entry in marked:
            entry.state = "Unpreparing"
        try:
            checkpoint.write(cp)
        except CheckpointError as e:
            for entry in marked:
                entry.state = "Prepared"
            for uid, (ref, _) in todo.items():
                out[uid] = f"claim {ref}: nothing was unprepared: {e}; the kubelet retries"
            return out
        crash("unprepare-recorded")
    done: list[ClaimRef] = []
    for uid, (ref, entry) in todo.items():
        errors = release.release(cp, entry)
        if errors:
            out[uid] = f"claim {ref}: {'; '.join(errors)}; the kubelet retries"
            continue
        del cp.claims[uid]
        done.append(ref)
    if done:
        try:
            checkpoint.write(cp)
        except CheckpointError as e:     # all is released; the claims stay Unpreparing until recorded
            for ref in done:
                out[ref.uid] = f"claim {ref}: its devices are released but {e}; the kubelet retries"
            return out
    for ref in done:
        out[ref.uid] = ""
        log.info("unprepared claim %s (uid %s)", ref, ref.uid)
    return out
