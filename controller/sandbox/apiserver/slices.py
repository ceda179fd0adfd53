"""ResourceSlice rules (kubernetes pkg/registry/resource/resourceslice/strategy.go): the fields of a gate
that is off are dropped unless the stored slice already uses them."""

from __future__ import annotations

from .gates import FeatureGates
from .strategy import Strategy


class SliceStrategy(Strategy):
    def prepare_for_create(self, obj: dict, gates: FeatureGates) -> None:
        drop_disabled_fields(obj, None, gates)

    def prepare_for_update(self, obj: dict, old: dict, gates: FeatureGates) -> None:
        drop_disabled_fields(obj, old, gates)


def drop_disabled_fields(obj: dict, old: dict | None, gates: FeatureGates) -> None:
    if not gates.off:
        return
    spec = obj.get("spec") or {}
    old_spec = (old or {}).get("spec") or {}
    old_devices = old_spec.get("devices") or []
    if not gates.enabled("DRADeviceTaints") and not any(d.get("taints") for d in old_devices):
        for d in spec.get("devices") or []:
            d.pop("taints", None)
    if not gates.enabled("DRAPartitionableDevices") and not (
            old_spec.get("sharedCounters") or any(d.get("consumesCounters") for d in old_devices)):
        spec.pop("sharedCounters", None)
        spec.pop("perDeviceNodeSelection", None)
        for d in spec.get("devices") or []:
            d.pop("consumesCounters", None)
    if not gates.enabled("DRAConsumableCapacity") and not any(d.get("allowMultipleAllocations") for d in old_devices):
        for d in spec.get("devices") or []:
            d.pop("allowMultipleAllocations", None)
            for cap in (d.get("capacity") or {}).values():
                cap.pop("requestPolicy", None)
