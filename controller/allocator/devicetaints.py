"""DeviceTaintRules merged into ResourceSlices' device taints, as kube-scheduler's slice tracker does.

kube-scheduler (k8s.io/dynamic-resource-allocation/resourceslice/tracker) allocates from slices "patched"
with every DeviceTaintRule (resource.k8s.io v1alpha3 in 1.33-1.35, beta in 1.36): for each rule whose
``spec.deviceSelector`` selects a device, the rule's ``spec.taint`` (key, value, effect, timeAdded) is
appended to the device's taints. The selector's criteria are ANDed:

* ``driver``, ``pool``, ``device``: equal to the slice's driver, pool name and device name;
* ``deviceClassName`` (1.33/1.34 only): the class exists and all its CEL selectors match the device;
* ``selectors`` (1.33/1.34 only): all CEL selectors match the device (an error: no match);
* no ``deviceSelector`` at all: every device (the tracker applies the rule without filtering).

Effects are the device taint's: NoSchedule and NoExecute keep new allocations away unless tolerated,
NoExecute also evicts (upstream's device-taint eviction controller), None (1.35+) is informational.

Merged taints carry the rule's name under :data:`RULE_FIELD` (not an API field; never written back), so
that ``partita explain`` and the controller's events can name the rule.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .cel import CelError, Evaluator, device_input

log = logging.getLogger(__name__)

#: merged taints name their DeviceTaintRule here
RULE_FIELD = "deviceTaintRule"
KIND = "DeviceTaintRule"
PLURAL = "devicetaintrules"
GROUP = "resource.k8s.io"
#: API versions that serve DeviceTaintRule, most preferred first (discovery picks the first one served)
VERSIONS = ("v1", "v1beta2", "v1alpha3")
EFFECTS = ("NoSchedule", "NoExecute", "None")


@dataclass(frozen=True)
class RuleProblem:
    rule: str
    message: str


def rule_name(rule: Mapping) -> str:
    return str((rule.get("metadata") or {}).get("name") or "?")


def validate(rule: Mapping) -> str:
    """"" for a rule we can apply, else what is wrong with it (named field and fix)."""
    name = rule_name(rule)
    spec = rule.get("spec")
    if not isinstance(spec, Mapping):
        return f"DeviceTaintRule {name}: spec is missing; give spec.taint and spec.deviceSelector"
    taint = spec.get("taint")
    if not isinstance(taint, Mapping) or not taint.get("key"):
        return f"DeviceTaintRule {name}: spec.taint.key is required"
    if taint.get("effect") not in EFFECTS:
        return (f"DeviceTaintRule {name}: spec.taint.effect {taint.get('effect')!r} is not one of "
                f"{', '.join(EFFECTS)}")
    sel = spec.get("deviceSelector")
    if sel is not None and not isinstance(sel, Mapping):
        return f"DeviceTaintRule {name}: spec.deviceSelector must be an object (driver, pool, device)"
    return ""


def rule_taint(rule: Mapping) -> dict:
    """The taint a rule adds, as it appears on a patched device."""
    t = rule["spec"]["taint"]
    out = {"key": t["key"], "effect": t["effect"]}
    if t.get("value"):
        out["value"] = t["value"]
    if t.get("timeAdded"):
        out["timeAdded"] = t["timeAdded"]
    out[RULE_FIELD] = rule_name(rule)
    return out


class TaintRules:
    """The DeviceTaintRules known, applied to slices."""

    def __init__(self, rules: Iterable[Mapping] = (), classes: Mapping[str, Mapping] | None = None,
                 evaluator: Evaluator | None = None):
        self.rules: dict[str, dict] = {}
        self.problems: dict[str, str] = {}
        self.classes = classes if classes is not None else {}
        self.evaluator = evaluator or Evaluator()
        for r in rules:
            self.upsert(r)

    def upsert(self, rule: Mapping) -> None:
        name = rule_name(rule)
        why = validate(rule)
        if why:
            self.rules.pop(name, None)
            if self.problems.get(name) != why:
                log.error("%s; the rule is ignored until it is fixed", why)
            self.problems[name] = why
            return
        self.problems.pop(name, None)
        self.rules[name] = dict(rule)

    def delete(self, name: str) -> None:
        self.rules.pop(name, None)
        self.problems.pop(name, None)

    def __bool__(self) -> bool:
        return bool(self.rules)

    # -- selection ------------------------------------------------------------------------------
    def _cel_all(self, exprs: Sequence[str], driver: str, device: Mapping, rule: str) -> bool:
        if not exprs:
            return True
        try:
            dev = device_input(driver, device.get("attributes") or {}, device.get("capacity") or {},
                               bool(device.get("allowMultipleAllocations")))
        except CelError:
            return False
        for expr in exprs:
            try:
                if not self.evaluator.matches(self.evaluator.compile(expr), dev):
                    return False
            except CelError as e:
                log.debug("DeviceTaintRule %s: selector %r on device %s: %s", rule, expr, device.get("name"), e)
                return False
        return True

    def selects(self, rule: Mapping, driver: str, pool: str, device: Mapping) -> bool:
        sel = (rule.get("spec") or {}).get("deviceSelector")
        if sel is None:
            return True
        if sel.get("driver") is not None and sel["driver"] != driver:
            return False
        if sel.get("pool") is not None and sel["pool"] != pool:
            return False
        if sel.get("device") is not None and sel["device"] != device.get("name"):
            return False
        exprs: list[str] = []
        if sel.get("deviceClassName") is not None:
            cls = self.classes.get(sel["deviceClassName"])
            if cls is None:
                return False     # upstream: the rule does not apply while the class does not exist
            exprs += [(s.get("cel") or {}).get("expression", "") for s in (cls.get("spec") or {}).get("selectors") or []
                      if s.get("cel")]
        exprs += [(s.get("cel") or {}).get("expression", "") for s in sel.get("selectors") or [] if s.get("cel")]
        return self._cel_all(exprs, driver, device, rule_name(rule))

    # -- patching -------------------------------------------------------------------------------
    def patch(self, slice_: Mapping) -> Mapping:
        """The slice with every matching rule's taint appended to its devices (the same object when no
        rule applies). A patched slice's resourceVersion gets a suffix naming what was applied, so that
        indexes compiling a slice once per resourceVersion see the change (and only then)."""
        if not self.rules:
            return slice_
        spec = slice_.get("spec") or {}
        driver, pool = spec.get("driver", ""), (spec.get("pool") or {}).get("name", "")
        patched = None
        applied = []
        for name in sorted(self.rules):
            rule = self.rules[name]
            for i, dev in enumerate(spec.get("devices") or []):
                if not self.selects(rule, driver, pool, dev):
                    continue
                if patched is None:
                    patched = copy.deepcopy(dict(slice_))
                pdev = patched["spec"]["devices"][i]
                taint = rule_taint(rule)
                pdev["taints"] = list(pdev.get("taints") or []) + [taint]
                applied.append((i, taint))
        if patched is None:
            return slice_
        digest = hashlib.sha1(json.dumps(applied, sort_keys=True).encode()).hexdigest()[:12]
        md = patched.setdefault("metadata", {})
        md["resourceVersion"] = f"{md.get('resourceVersion', '')}+taints-{digest}"
        return patched

    def patch_all(self, slices: Iterable[Mapping]) -> list[Mapping]:
        return [self.patch(s) for s in slices]

    def devices(self, rule: Mapping, slices: Iterable[Mapping]) -> list[tuple[str, str, str]]:
        """(driver, pool, device) of every published device the rule selects."""
        out = []
        for s in slices:
            spec = s.get("spec") or {}
            driver, pool = spec.get("driver", ""), (spec.get("pool") or {}).get("name", "")
            for dev in spec.get("devices") or []:
                if self.selects(rule, driver, pool, dev):
                    out.append((driver, pool, dev.get("name", "")))
        return out


def served_version(discovery: Mapping[str, Sequence[str]]) -> str | None:
    """The preferred version serving devicetaintrules, from ``{version: [resource plural, ...]}``."""
    for v in VERSIONS:
        if PLURAL in (discovery.get(v) or ()):
            return v
    return None
