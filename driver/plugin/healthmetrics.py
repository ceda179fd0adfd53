"""``partita_device_health{node,device,uuid,state}`` (driver/plugin/metrics.py, a contract with the dashboards):
one series per published device, value 1, labelled with its current health state; the series of its
previous state is removed. ``uuid`` is the GPU's UUID for whole and shared devices and for MIG devices
(a MIG placement has no UUID until an instance exists; the parent GPU is the one that fails)."""

from __future__ import annotations

from driver.inventory import Inventory
from driver.plugin import metrics
from driver.plugin.devices import device_index
from driver.plugin.healthmon import HealthView


class DeviceHealthGauge:
    def __init__(self, node_name: str, inventory: Inventory):
        self.node = node_name
        self._devices = {name: ref.gpu.uuid for name, ref in device_index(inventory).items()}
        self._series: dict[str, tuple[str, str]] = {}      # device -> (uuid, state) exported

    def update(self, view: HealthView) -> None:
        for name, uuid in sorted(self._devices.items()):
            state = view.device(uuid, name).state
            old = self._series.get(name)
            if old == (uuid, state):
                continue
            if old is not None:
                try:
                    metrics.DEVICE_HEALTH.remove(self.node, name, old[0], old[1])
                except KeyError:
                    pass
            metrics.DEVICE_HEALTH.labels(self.node, name, uuid, state).set(1)
            self._series[name] = (uuid, state)
