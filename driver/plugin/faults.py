"""Crash points for the crash-safety tests: with the fake NVML backend and ``PARTITA_CRASH_AT=<point>`` in
its environment, the plugin SIGKILLs itself when it reaches that point, exactly as an OOM kill or a node
power loss would stop it. Never honoured with the real backend."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "PARTITA_CRASH_AT"

#: every point, in the order a MIG prepare and then its unprepare pass them
PREPARE_POINTS = ("mig-intent-recorded", "mig-mode-enabled", "gpu-instance-created", "gpu-instance-recorded",
                  "compute-instance-created", "mig-device-recorded", "cdi-spec-written", "claim-prepared")
UNPREPARE_POINTS = ("unprepare-recorded", "mig-destroyed", "mig-mode-disabled", "cdi-spec-removed")
#: passed by a shared (or configured whole GPU) claim: after its sharing set-up (MPS daemon, time-slice)
SHARE_POINTS = ("share-set-up",)
POINTS = PREPARE_POINTS + UNPREPARE_POINTS + SHARE_POINTS


def crash_point(name: str, backend_kind: str) -> None:
    assert name in POINTS, name
    if backend_kind == "fake" and os.environ.get(ENV) == name:
        log.warning("%s=%s: killing the plugin here", ENV, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
