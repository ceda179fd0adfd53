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
from driver.plugin.idle import IdleDetector, PodEvents
from driver.plugin.observers import Observers, claim_view
from driver.plugin.prepare import ClaimRef, DeviceState, PrepareError
from driver.plugin.usage import ProcessOwners, UsageSampler

log = logging.getLogger(__name__)


def _seconds(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{value}: seconds must not be negative")
    return v


def ratio(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid utilization ratio {value!r} (0.05 = 5 %)") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{value}: a utilization ratio above 0 and at most 1 (0.05 = 5 %)")
    return v


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
    p.add_argument("--usage-interval", type=_seconds, default=env("USAGE_INTERVAL", "15"), metavar="SECONDS",
                   help="seconds between samples of prepared claims' GPU utilization and memory (metrics "
                        "partita_gpu_*); 0 = off, which also turns idle detection off (env USAGE_INTERVAL; "
                        "default %(default)s)")
    p.add_argument("--idle-threshold", type=ratio, default=env("IDLE_THRESHOLD", "0.05"), metavar="RATIO",
                   help="a claim whose devices stay below this utilization (0..1) for --idle-period is reported "
                        "idle: metric partita_claim_idle, condition Idle in its status.devices, an Event on its "
                        "pods; never evicted (env IDLE_THRESHOLD; default %(default)s)")
    p.add_argument("--idle-period", type=_seconds, default=env("IDLE_PERIOD", "1800"), metavar="SECONDS",
                   help="how long a claim must stay below --idle-threshold to be reported idle (env IDLE_PERIOD; "
                        "default %(default)s)")
    p.add_argument("--proc-root", default=env("PROC_ROOT", "/proc"), metavar="DIR",
                   help="where the node's processes are seen, to map a shared GPU's processes to claims through "
                        "their environment or cgroup (needs hostPID; env PROC_ROOT; default %(default)s)")


def start_observers(args: argparse.Namespace, kube: Kube, backend: NvmlBackend, state: DeviceState, claims,  # noqa: ANN001
                    stop: asyncio.Event) -> tuple[Observers, list[asyncio.Task]]:
    """The observers the flags ask for, and their background tasks (cancelled at shutdown)."""
    observers = Observers()
    tasks: list[asyncio.Task] = []
    writer = None
    if getattr(args, "device_status", True):
        writer = DeviceStatusWriter(kube, args.driver_name, args.node_name)
        observers.add(writer)
    interval = float(getattr(args, "usage_interval", 0) or 0)
    if interval > 0:
        idle = IdleDetector(args.node_name, threshold=float(getattr(args, "idle_threshold", 0.05)),
                            period=float(getattr(args, "idle_period", 1800)), writer=writer,
                            events=PodEvents(kube, args.node_name))
        sampler = UsageSampler(backend, args.node_name, owners=ProcessOwners(getattr(args, "proc_root", "/proc")),
                               idle=idle)
        observers.add(sampler)
        tasks.append(asyncio.create_task(sampler.run(stop, interval), name="usage"))
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
                                      state.inventory, state.devices))
        n += 1
    return n
