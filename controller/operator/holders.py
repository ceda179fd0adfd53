"""Which claims hold each device, feeding the allocator's AllocatedState.

AllocatedState (upstream's shape) holds each dedicated device, and each (device, shareID), once. If two
claims ever hold one device (a double allocation that reached the API), releasing one of them must not
free the device for a third: here every device and share counts its holders, and the device leaves
AllocatedState only when its last holder lets go. A double allocation is logged loudly (and counted) when
it is seen, and the device stays unavailable until all of its holders are gone.
"""

from __future__ import annotations

import logging
from typing import Mapping

from controller.allocator import AllocatedState
from controller.allocator.types import DeviceID
from driver.api.quantity import Quantity

from . import metrics

log = logging.getLogger(__name__)


class Holders:
    def __init__(self, state: AllocatedState):
        self.state = state
        self.dedicated: dict[DeviceID, dict[str, str]] = {}          # device -> claim uid -> claim key
        self.shares: dict[tuple[DeviceID, str], dict[str, str]] = {}  # (device, shareID) -> uid -> key
        self.doubles_seen = 0

    def holders(self, did: DeviceID) -> list[str]:
        """Keys of the claims holding ``did`` as a dedicated device."""
        return sorted(self.dedicated.get(did, {}).values())

    def double_held(self) -> dict[DeviceID, list[str]]:
        return {d: sorted(h.values()) for d, h in self.dedicated.items() if len(h) > 1}

    def add(self, uid: str, claim_key: str, allocation: Mapping) -> None:
        for r, did in _results(allocation):
            share = r.get("shareID")
            if share:
                holders = self.shares.setdefault((did, share), {})
                if not holders:
                    self.state.add_share(did, share)
                elif uid not in holders:
                    self._double(f"share {share} of device {_name(did)}", [*holders.values(), claim_key])
                holders[uid] = claim_key
                consumed = {k: Quantity.parse(v) for k, v in (r.get("consumedCapacity") or {}).items()}
                if consumed:
                    self.state.add_capacity(did, consumed, 1)
                continue
            holders = self.dedicated.setdefault(did, {})
            if not holders:
                self.state.add_device(did)
            elif uid not in holders:
                self._double(f"device {_name(did)}", [*holders.values(), claim_key])
            holders[uid] = claim_key

    def remove(self, uid: str, allocation: Mapping) -> None:
        for r, did in _results(allocation):
            share = r.get("shareID")
            if share:
                holders = self.shares.get((did, share), {})
                holders.pop(uid, None)
                if not holders:
                    self.shares.pop((did, share), None)
                    self.state.remove_share(did, share)
                consumed = {k: Quantity.parse(v) for k, v in (r.get("consumedCapacity") or {}).items()}
                if consumed and did in self.state.capacity:
                    self.state.add_capacity(did, consumed, -1)
                continue
            holders = self.dedicated.get(did, {})
            holders.pop(uid, None)
            if not holders:
                self.dedicated.pop(did, None)
                self.state.remove_device(did)
            elif len(holders) == 1:
                log.warning("device %s is held by claim %s alone again; it stays allocated", _name(did),
                            next(iter(holders.values())))

    def _double(self, what: str, claims: list[str]) -> None:
        self.doubles_seen += 1
        metrics.DOUBLE_ALLOCATIONS.inc()
        log.error("DOUBLE ALLOCATION: %s is allocated to %d claims (%s) — two allocators wrote it (a leadership "
                  "handover or a second controller?); it stays unavailable until every one of them releases it",
                  what, len(claims), ", ".join(sorted(claims)))


def _results(allocation: Mapping) -> list[tuple[Mapping, DeviceID]]:
    out = []
    for r in ((allocation.get("devices") or {}).get("results") or []):
        if r.get("adminAccess"):
            continue
        out.append((r, DeviceID(r["driver"], r["pool"], r["device"])))
    return out


def _name(did: DeviceID) -> str:
    return f"{did.driver}/{did.pool}/{did.device}"
