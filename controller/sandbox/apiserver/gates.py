"""Feature gates the emulator can turn off: a real API server with the gate off drops the gated fields from
writes, unless the stored object already uses them (the strategies' ``dropDisabledFields``)."""

from __future__ import annotations

from typing import Iterable

#: feature gate -> what a real API server drops from ResourceSlices/claim status when it is off
FEATURES = ("DRADeviceTaints", "DRAPartitionableDevices", "DRAConsumableCapacity", "DRAResourceClaimDeviceStatus")


class FeatureGates:
    """The gates that are off (all on by default)."""

    def __init__(self) -> None:
        self.off: frozenset[str] = frozenset()

    def turn_off(self, gates: Iterable[str]) -> None:
        """Replace the set of gates that are off."""
        gates = frozenset(gates)
        unknown = gates - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature gates {sorted(unknown)}; known: {FEATURES}")
        self.off = gates

    def enabled(self, gate: str) -> bool:
        return gate not in self.off
