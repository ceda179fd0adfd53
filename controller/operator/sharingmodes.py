"""Keep time-slicing and MPS shares off each other's GPUs.

A GPU serves one sharing strategy at a time (MPS needs it in exclusive-process mode), and the plugin
refuses a share whose strategy differs from the GPU's current shares. The upstream allocator knows
nothing of opaque configs, so the controller adds the rule: shared devices holding shares of another
strategy are in the allocator's ``unavailable`` set for the claim. (In scheduler allocation mode kube-scheduler cannot
do this; there the plugin's refusal is the only guard — keep strategies on separate GPUs with classes.)
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping

from controller.allocator.types import DeviceID
from driver.api.config import ConfigError, config_applies, parse_gpu_config

DEFAULT = "TimeSlicing"


def _strategy(parameters: object) -> str | None:
    try:
        cfg = parse_gpu_config(parameters)
    except ConfigError:
        return None          # invalid configs are reported elsewhere; they do not decide placement
    return cfg.sharing.strategy if cfg.sharing is not None else DEFAULT


def _last_applying(entries: list[tuple[list[str] | None, str | None]], request: str) -> str:
    chosen = DEFAULT
    for requests, strategy in entries:
        if strategy is not None and config_applies(requests, request):
            chosen = strategy
    return chosen


def allocation_shares(allocation: Mapping, driver: str) -> dict[DeviceID, str]:
    """Strategy of each share in an allocation (results with a shareID of our driver)."""
    devices = allocation.get("devices") or {}
    entries = []
    for source in ("FromClass", "FromClaim"):
        for c in devices.get("config") or []:
            opaque = c.get("opaque") or {}
            if c.get("source") == source and opaque.get("driver") == driver:
                entries.append((c.get("requests"), _strategy(opaque.get("parameters"))))
    return {DeviceID(r["driver"], r["pool"], r["device"]): _last_applying(entries, r.get("request", ""))
            for r in devices.get("results") or [] if r.get("shareID") and r.get("driver") == driver}


def claim_strategies(claim: Mapping, classes: Mapping[str, Mapping], driver: str) -> set[str]:
    """The strategies a claim's requests would be prepared with (class config first, then claim)."""
    spec = (claim.get("spec") or {}).get("devices") or {}
    claim_entries = [(c.get("requests"), _strategy((c.get("opaque") or {}).get("parameters")))
                     for c in spec.get("config") or [] if (c.get("opaque") or {}).get("driver") == driver]
    out = set()
    for req in spec.get("requests") or []:
        subs = [req["exactly"]] if "exactly" in req else req.get("firstAvailable") or []
        for sub in subs:
            cls = classes.get(sub.get("deviceClassName", "")) or {}
            entries = [(None, _strategy((c.get("opaque") or {}).get("parameters")))
                       for c in (cls.get("spec") or {}).get("config") or []
                       if (c.get("opaque") or {}).get("driver") == driver]
            name = req.get("name", "") if "exactly" in req else f"{req.get('name', '')}/{sub.get('name', '')}"
            out.add(_last_applying(entries + claim_entries, name))
    return out


class ShareModes:
    """Per shared device, how many shares of each strategy are allocated."""

    def __init__(self, driver: str):
        self.driver = driver
        self.by_device: dict[DeviceID, Counter] = {}

    def add(self, allocation: Mapping, sign: int) -> None:
        for did, strategy in allocation_shares(allocation, self.driver).items():
            counts = self.by_device.setdefault(did, Counter())
            counts[strategy] += sign
            if counts[strategy] <= 0:
                del counts[strategy]
            if not counts:
                del self.by_device[did]

    def conflicting(self, strategies: set[str]) -> list[DeviceID]:
        if len(strategies) != 1:
            return []            # mixed strategies within one claim: the plugin decides per share
        [s] = strategies
        return [did for did, counts in self.by_device.items() if set(counts) - {s}]

    def unavailable(self, claims: list[Mapping], classes: Mapping[str, Mapping]) -> set[DeviceID]:
        """Devices the claims may not use: shared devices holding shares of another strategy (the allocator's
        ``unavailable`` set)."""
        strategies = set().union(*(claim_strategies(c, classes, self.driver) for c in claims)) if claims else set()
        return set(self.conflicting(strategies))
