"""DeviceTaintRules in controller mode: what kube-scheduler merges into device taints, the controller must
merge too (a device an administrator tainted NoSchedule for maintenance gets no new allocations).

* :func:`discover_version`: which resource.k8s.io version the cluster serves DeviceTaintRules in
  (v1alpha3 on 1.33-1.35 with the DRADeviceTaintRules gate, beta on 1.36); None: not served, nothing to
  watch (the controller then allocates from the slices as published, as kube-scheduler does).
* :class:`RuleState`: the rules and the raw slices they patch; the cache hands it every slice and every
  rule event and indexes the patched slices (controller.allocator.devicetaints does the merging).
* :func:`noexecute_hits`: allocated devices a NoExecute rule taints that their allocation does not
  tolerate; the controller posts an Event on each pod using them (upstream's device-taint eviction
  controller in kube-controller-manager evicts those pods; Partita only reports).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from controller.allocator.devicetaints import GROUP, PLURAL, VERSIONS, TaintRules, rule_name, served_version
from controller.allocator.search import tolerates
from driver.api.kube import Kube, KubeError
from driver.api.objects import allocated_results, request_tolerations

log = logging.getLogger(__name__)


async def discover_version(kube: Kube) -> str | None:
    """The preferred resource.k8s.io version listing devicetaintrules, by API discovery."""
    try:
        group = await kube.get(f"/apis/{GROUP}")
    except (KubeError, OSError) as e:
        log.warning("API discovery of %s failed (%s); DeviceTaintRules are not watched", GROUP, e)
        return None
    offered = [v.get("version") for v in group.get("versions") or []]
    found: dict[str, list[str]] = {}
    for v in VERSIONS:
        if v not in offered:
            continue
        try:
            res = await kube.get(f"/apis/{GROUP}/{v}")
        except (KubeError, OSError):
            continue
        found[v] = [r.get("name", "") for r in res.get("resources") or []]
    version = served_version(found)
    if version is None:
        log.info("the cluster serves no DeviceTaintRules (%s versions %s); none are watched", GROUP, offered)
    else:
        log.info("watching DeviceTaintRules in %s/%s", GROUP, version)
    return version


class RuleState:
    """The DeviceTaintRules and the raw ResourceSlices of our driver they patch."""

    def __init__(self, classes: Mapping[str, Mapping]):
        self.rules = TaintRules(classes=classes)
        self.raw: dict[str, Mapping] = {}

    def track(self, etype: str, slice_: Mapping) -> None:
        name = slice_["metadata"]["name"]
        if etype == "DELETED":
            self.raw.pop(name, None)
        else:
            self.raw[name] = slice_

    def patch(self, slice_: Mapping) -> Mapping:
        return self.rules.patch(slice_)

    def on_rule(self, etype: str, rule: Mapping) -> list[Mapping]:
        """Apply a rule event; the raw slices to index again (every one: a rule may select any device)."""
        name = rule_name(rule)
        if etype == "DELETED":
            self.rules.delete(name)
        else:
            self.rules.upsert(rule)
        return list(self.raw.values())

    def device(self, driver: str, pool: str, name: str) -> Mapping:
        for s in self.raw.values():
            spec = s.get("spec") or {}
            if spec.get("driver") == driver and (spec.get("pool") or {}).get("name") == pool:
                for d in spec.get("devices") or []:
                    if d.get("name") == name:
                        return d
        return {"name": name}       # no longer published: driver/pool/device selectors still apply

    def untolerated(self, claims: Sequence[Mapping]) -> list[str]:
        """For a pending pod's event: the rules with an effect on scheduling that select published devices
        and that some request of the claims does not tolerate."""
        out = []
        for name, rule in sorted(self.rules.rules.items()):
            taint = rule["spec"]["taint"]
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            devices = self.rules.devices(rule, self.raw.values())
            if not devices:
                continue
            tols = [ts for c in claims for ts in request_tolerations(c)]
            if all(any(tolerates(t, taint) for t in ts) for ts in tols):
                continue
            value = f"={taint['value']}" if taint.get("value") else ""
            out.append(f"DeviceTaintRule {name} taints {len(devices)} device(s) {taint['key']}{value}:{taint['effect']} "
                       f"(e.g. {devices[0][1]}/{devices[0][2]})")
        return out


@dataclass(frozen=True)
class Hit:
    claim: Mapping
    device: str        # pool/device
    rule: str
    taint: str


def noexecute_hits(state: RuleState, rule: Mapping, claims: Iterable[Mapping]) -> list[Hit]:
    """Allocated devices the NoExecute ``rule`` selects whose allocation result does not tolerate it."""
    taint = (rule.get("spec") or {}).get("taint") or {}
    if taint.get("effect") != "NoExecute":
        return []
    value = f"={taint['value']}" if taint.get("value") else ""
    label = f"{taint.get('key')}{value}:NoExecute"
    out = []
    for c in claims:
        for r in allocated_results(c):
            dev = state.device(r.get("driver", ""), r.get("pool", ""), r.get("device", ""))
            if not state.rules.selects(rule, r.get("driver", ""), r.get("pool", ""), dev):
                continue
            matching = [t for t in r.get("tolerations") or [] if tolerates(t, taint)]
            if any(t.get("tolerationSeconds") is None for t in matching):
                continue                  # tolerated for good
            seconds = min((int(t["tolerationSeconds"]) for t in matching), default=None)
            when = "" if seconds is None else \
                f" after {max(seconds, 0)}s (tolerationSeconds) from the taint's timeAdded {taint.get('timeAdded', '(unset)')}"
            out.append(Hit(c, f"{r.get('pool')}/{r.get('device')}", rule_name(rule), label + when))
    return out


__all__ = ["Hit", "RuleState", "discover_version", "noexecute_hits", "PLURAL", "GROUP"]
