"""The plugin's health flags and the wiring of the health monitor to its listeners (docs/health.md):

    monitor -> publisher.update_health (device taints) -> ResourceSlices
            -> ResourceHealth.notify (the kubelet's health stream, KEP-4680)
            -> DeviceHealthGauge.update (partita_device_health)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from driver.inventory import Inventory
from driver.nvml.interface import NvmlBackend
from driver.plugin.drahealth import ResourceHealth
from driver.plugin.healthmetrics import DeviceHealthGauge
from driver.plugin.healthmon import HealthConfig, HealthMonitor, HealthView, health_taints, parse_effects, parse_xids
from driver.plugin.prepare import DeviceState
from driver.publisher import SlicePublisher
from driver.errors import PartitaError

#: the events file the fake NVML follows, under the fake state directory, when --fake-events is not given
DEFAULT_EVENTS_FILE = "events.jsonl"


class HealthFlagError(PartitaError, ValueError):
    pass


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--health-check-interval", type=float, default=float(_env("HEALTH_CHECK_INTERVAL", "5")),
                   help="seconds between periodic GPU health checks (reachable, retired pages / remapped rows "
                        "pending, the driver's recovery action); 0 = none (env HEALTH_CHECK_INTERVAL; default "
                        "%(default)s)")
    p.add_argument("--health-events", choices=("on", "off"), default=_env("HEALTH_EVENTS", "on"),
                   help="watch NVML health events (XID critical errors, double-bit ECC) (env HEALTH_EVENTS)")
    p.add_argument("--health-quiet-period", type=float, default=float(_env("HEALTH_QUIET_PERIOD", "60")),
                   help="seconds an unhealthy device must stay clean (no bad event, clean checks) before its "
                        "taint is removed (env HEALTH_QUIET_PERIOD; default %(default)s)")
    p.add_argument("--health-taint-effects", default=_env("HEALTH_TAINT_EFFECTS", ""),
                   help="taint effect per health state, e.g. degraded=NoSchedule,fatal=NoExecute,lost=NoExecute "
                        "(the defaults); an effect is NoSchedule, NoExecute or None (env HEALTH_TAINT_EFFECTS)")
    p.add_argument("--health-ignore-xids", default=_env("HEALTH_IGNORE_XIDS", ""),
                   help="XIDs to ignore besides the application XIDs 13,31,43,45,68,109 (env HEALTH_IGNORE_XIDS)")
    p.add_argument("--fake-events", default=os.environ.get("FAKE_GPU_EVENTS"),
                   help="--nvml fake: JSON-lines file of injected health events the fake GPUs follow (`partita "
                        "fake-inject` appends to it) (env FAKE_GPU_EVENTS; default <fake state dir>/events.jsonl)")


def health_config(args: argparse.Namespace) -> HealthConfig:
    """HealthFlagError naming the flag for a value that cannot be used."""
    try:
        effects = parse_effects(getattr(args, "health_taint_effects", ""))
        ignored = parse_xids(getattr(args, "health_ignore_xids", ""))
    except ValueError as e:
        raise HealthFlagError(str(e)) from None
    interval = float(getattr(args, "health_check_interval", 5.0))
    quiet = float(getattr(args, "health_quiet_period", 60.0))
    if interval < 0:
        raise HealthFlagError(f"--health-check-interval {interval:g} is negative; give seconds, or 0 for no checks")
    if quiet < 0:
        raise HealthFlagError(f"--health-quiet-period {quiet:g} is negative; give seconds, e.g. 60")
    return HealthConfig(quiet_seconds=quiet, check_interval=interval,
                        events=getattr(args, "health_events", "on") == "on", effects=effects, extra_ignored_xids=ignored)


def events_file(args: argparse.Namespace, state_dir: Path) -> Path:
    return Path(args.fake_events) if getattr(args, "fake_events", None) else state_dir / DEFAULT_EVENTS_FILE


@dataclass
class Health:
    monitor: HealthMonitor
    stream: ResourceHealth
    gauge: DeviceHealthGauge


def wire_health(config: HealthConfig, backend: NvmlBackend, inventory: Inventory, node_name: str,
                publisher: SlicePublisher, state: DeviceState, device_status=None) -> Health:  # noqa: ANN001
    """The monitor and its listeners; one synchronous check first, so the first slices already carry the
    taints of GPUs that are unhealthy at start. ``device_status``: the claims' ``status.devices`` writer
    (driver/plugin/devicestatus.py) whose ``Healthy`` conditions follow the monitor, or None when it is off."""
    monitor = HealthMonitor(backend, inventory, config, node_name=node_name)
    stream = ResourceHealth(state, monitor.view)
    gauge = DeviceHealthGauge(node_name, inventory)

    def changed(view: HealthView) -> None:
        publisher.update_health(health_taints(view, config.effects))
        stream.notify(view)
        gauge.update(view)
        if conditions is not None:
            conditions.update(view)

    conditions = HealthConditions(device_status) if device_status is not None else None

    monitor.subscribe(changed)
    if config.check_interval > 0:
        monitor.check_now()
    changed(monitor.view())
    return Health(monitor, stream, gauge)


class HealthConditions:
    """Keeps the ``Healthy`` condition of prepared devices in claims' ``status.devices`` (KEP-4817) equal to
    the monitor's view: a GPU or MIG device that turns unhealthy gets ``Healthy=False`` with the state as its
    reason (``DeviceDegraded``, ``DeviceLost``, ``DeviceFatal``), and ``True`` again when it recovers. Only
    changes are written."""

    def __init__(self, writer) -> None:  # noqa: ANN001 - a DeviceStatusWriter (set_device_health)
        self.writer = writer
        self._set: dict[str, tuple[str, str]] = {}    # GPU UUID or MIG device name -> (state, reason) written

    def update(self, view: HealthView) -> None:
        now = {t: (h.state, h.reason) for t, h in [*view.gpus.items(), *view.migs.items()] if not h.healthy}
        for target, (state, why) in now.items():
            if self._set.get(target) != (state, why):
                self.writer.set_device_health(target, False, "Device" + state[:1].upper() + state[1:],
                                              f"the health monitor reports this device {state}: {why}")
        for target in set(self._set) - set(now):
            self.writer.set_device_health(target, True)
        self._set = now
