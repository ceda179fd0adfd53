"""The node's boot id: a reboot loses MIG instances, CDI specs under /var/run and MPS daemons, while the
plugin's checkpoint (under /var/lib/kubelet) keeps the claims it prepared. The checkpoint stores the boot
id it was written under; a different one at start means the node rebooted.

``PARTITA_BOOT_ID_FILE`` points elsewhere (tests and the sandbox simulate reboots by changing that file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "PARTITA_BOOT_ID_FILE"
DEFAULT_PATH = Path("/proc/sys/kernel/random/boot_id")


def default_path() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_PATH)


def read_boot_id(path: Path) -> str | None:
    """The boot id in ``path``; None (logged) where there is none (not Linux, or an unreadable file):
    reboots are then not detected, and prepared claims are still verified on every prepare."""
    try:
        value = path.read_text(errors="replace").strip()
    except OSError as e:
        log.warning("cannot read the boot id from %s (%s): node reboots are not detected", path, e.strerror)
        return None
    return value or None
