"""The plugin's claim telemetry, wired at start-up: ``status.devices`` (driver/plugin/devicestatus.py), usage
sampling and metrics (driver/plugin/usage.py) and idle claims (driver/plugin/idle.py), each a claim observer
(driver/plugin/observers.py) the gRPC service notifies after prepare and unprepare.

Claims prepared before this process started (the kubelet does not prepare them again after a plugin restart)
are read from the checkpoint and their claims from the API server, so their status and metrics come back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Callable

from driver.api.kube import Kube
from driver.nvml import NvmlBackend
from driver.plugin.devicestatus import DeviceStatusWriter
from driver.plugin.observers import Observers, claim_view
from driver.plugin.prepare import ClaimRef, DeviceState, PrepareError

log = logging.getLogger(__name__)


def _on_off(value: str) -> bool:
    v = str(value).strip().lower()
    if v not in ("on", "off", "true", "false"):
        raise argparse.ArgumentTypeError(f"invalid value {value!r} (choose on or off)")
    return v in ("on", "true")


def add_observer_arguments(p: argparse.ArgumentParser, env: Callable[[str, str], str | None]) -> None:
    p.add_argument("--device-status", type=_on_off, default=env("DEVICE_STATUS", "on"), metavar="on|off",
                   help="write prepared claims' status.devices (KEP-4817: the GPU and MIG UUIDs a pod got, "
                        "Ready/Healthy/Idle conditions); off where the plugin may not write claim status "
                        "(env DEVICE_STATUS; default %(default)s)")


def start_observers(args: argparse.Namespace, kube: Kube, backend: NvmlBackend, state: DeviceState, claims,  # noqa: ANN001
                    stop: asyncio.Event) -> tuple[Observers, list[asyncio.Task]]:
    """The observers the flags ask for, and their background tasks (cancelled at shutdown)."""
    observers = Observers()
    tasks: list[asyncio.Task] = []
    writer = None
    if getattr(args, "device_status", True):
        writer = DeviceStatusWriter(kube, args.driver_name, args.node_name)
        observers.add(writer)
    if observers:
        tasks.append(asyncio.create_task(restore_prepared(state, claims, observers), name="observe-prepared"))
    return observers, tasks


async def restore_prepared(state: DeviceState, claims, observers: Observers) -> int:  # noqa: ANN001
    """Tell the observers about the claims the checkpoint records as prepared; returns how many."""
    try:
        prepared = state.prepared_claims()
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is reported by prepare itself
        log.warning("cannot read the prepared claims for their status and metrics: %s", e)
        return 0
    n = 0
    for uid, entry in prepared.items():
        if entry.state != "Prepared":
            continue
        ref = ClaimRef(entry.namespace, entry.name, uid)
        try:
            claim = await claims.get(ref)
        except PrepareError as e:
            log.info("claim %s (uid %s): %s; not observed", ref, uid, e)
            continue
        if (claim.get("metadata") or {}).get("uid") != uid:
            continue
        observers.prepared(claim_view(state.driver_name, uid, entry.namespace, entry.name, claim, entry.devices,
                                      state.inventory))
        n += 1
    return n
