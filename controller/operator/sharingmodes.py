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
from driver.api.config import DEFAULT_STRATEGY, parsed_configs, resolve, resolve_parsed
from driver.api.objects import allocation_configs, allocation_results, device_configs, request_specs


def allocation_shares(allocation: Mapping, driver: str) -> dict[DeviceID, str]:
    """Strategy of each share in an allocation (results with a shareID of our driver), as the plugin will
    resolve it from the allocation's config; invalid configs are reported elsewhere and do not decide."""
    parsed = parsed_configs(allocation_configs(allocation), driver, strict=False)
    out = {}
    for r in allocation_results(allocation):
        if r.get("shareID") and r.get("driver") == driver:
            cfg = resolve_parsed(parsed, r.get("request", ""))
            out[DeviceID(r["driver"], r["pool"], r["device"])] = cfg.strategy if cfg else DEFAULT_STRATEGY
    return out


def claim_strategies(claim: Mapping, classes: Mapping[str, Mapping], driver: str) -> set[str]:
    """The strategies a claim's requests would be prepared with: the configs the allocation will carry
    (each request's class config first, then the claim's, as the allocator copies them) resolved as the
    plugin resolves them."""
    claim_configs = [{**c, "source": "FromClaim"} for c in device_configs(claim)]
    out = set()
    for rs in request_specs(claim):
        cls = classes.get(str(rs.spec.get("deviceClassName") or "")) or {}
        class_configs = [{"source": "FromClass", "opaque": c.get("opaque")}
                         for c in (cls.get("spec") or {}).get("config") or []]
        cfg = resolve(class_configs + claim_configs, driver, rs.full_name, strict=False)
        out.add(cfg.strategy if cfg else DEFAULT_STRATEGY)
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
