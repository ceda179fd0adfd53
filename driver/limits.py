"""Upstream ResourceSlice limits, and a checker that reports every violation by name.

Values from kubernetes/api ``resource/v1/types.go`` (constants ``ResourceSliceMaxDevices``,
``ResourceSliceMaxDevicesWithAdvancedFeatures``, ``ResourceSliceMaxCounterSets``,
``ResourceSliceMaxCountersPerCounterSet``, ``ResourceSliceMaxDeviceCounterConsumptionsPerDevice``,
``ResourceSliceMaxAttributesAndCapacitiesPerDevice``, ``DeviceAttributeMaxValueLength``,
``DriverNameMaxLength``, ``PoolNameMaxLength``, ``DeviceTaintsMaxLength``) and the validation of
kubernetes ``pkg/apis/resource/validation/validation.go`` that enforces them.
"""

from __future__ import annotations

import re
from typing import Iterable

from driver.api.naming import is_dns_label, is_dns_subdomain

MAX_DEVICES = 128
MAX_DEVICES_WITH_ADVANCED_FEATURES = 64      # any device with taints, consumesCounters or list attributes
MAX_COUNTER_SETS = 8
MAX_COUNTERS_PER_SET = 32
MAX_CONSUMES_COUNTERS = 2
MAX_ATTRIBUTES_AND_CAPACITIES = 32
MAX_ATTRIBUTE_VALUE_LENGTH = 64              # string and version values
MAX_DRIVER_NAME = 63
MAX_POOL_NAME = 253
MAX_TAINTS = 16
MAX_SLICE_NAME = 253

_C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_is_label = is_dns_label
_is_subdomain = is_dns_subdomain


def _is_qualified_name(name: str) -> bool:
    domain, sep, ident = name.rpartition("/")
    if sep and not _is_subdomain(domain, 63):
        return False
    return len(ident) <= 32 and bool(_C_IDENTIFIER.match(ident))


def device_uses_advanced_features(device: dict) -> bool:
    attrs = device.get("attributes") or {}
    lists = any(k in v for v in attrs.values() for k in ("ints", "bools", "strings", "versions"))
    return bool(device.get("taints") or device.get("consumesCounters") or lists)


def validate_slice(s: dict) -> list[str]:
    """Violations of one slice, each naming the slice, the device and the field."""
    name = s.get("metadata", {}).get("name", "<unnamed>")
    spec = s.get("spec", {})
    where = f"ResourceSlice {name}"
    out: list[str] = []
    if not _is_subdomain(name, MAX_SLICE_NAME):
        out.append(f"{where}: metadata.name is not a DNS subdomain of at most {MAX_SLICE_NAME} characters")
    driver = spec.get("driver", "")
    if not _is_subdomain(driver, MAX_DRIVER_NAME):
        out.append(f"{where}: spec.driver {driver!r} is not a DNS subdomain of at most {MAX_DRIVER_NAME} characters")
    pool = spec.get("pool") or {}
    pool_name = pool.get("name", "")
    if not pool_name or len(pool_name) > MAX_POOL_NAME or not all(_is_subdomain(p) for p in pool_name.split("/")):
        out.append(f"{where}: spec.pool.name {pool_name!r} must be DNS subdomains separated by '/', "
                   f"at most {MAX_POOL_NAME} characters")
    if not isinstance(pool.get("resourceSliceCount"), int) or pool.get("resourceSliceCount", 0) <= 0:
        out.append(f"{where}: spec.pool.resourceSliceCount must be a positive integer")
    if not isinstance(pool.get("generation"), int) or pool.get("generation", -1) < 0:
        out.append(f"{where}: spec.pool.generation must be a non-negative integer")
    selection = [k for k in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection") if spec.get(k)]
    if len(selection) != 1:
        out.append(f"{where}: exactly one of spec.nodeName, nodeSelector, allNodes, perDeviceNodeSelection "
                   f"must be set (set: {selection or 'none'})")
    devices = spec.get("devices") or []
    counter_sets = spec.get("sharedCounters") or []
    if devices and counter_sets:
        out.append(f"{where}: only one of spec.devices and spec.sharedCounters may be set; put counter sets "
                   "in their own slice")
    if len(counter_sets) > MAX_COUNTER_SETS:
        out.append(f"{where}: {len(counter_sets)} counter sets in spec.sharedCounters (max {MAX_COUNTER_SETS})")
    for cs in counter_sets:
        cname = cs.get("name", "")
        if not _is_label(cname):
            out.append(f"{where}: spec.sharedCounters name {cname!r} is not a DNS label")
        counters = cs.get("counters") or {}
        if len(counters) > MAX_COUNTERS_PER_SET:
            out.append(f"{where}: counter set {cname} has {len(counters)} counters (max {MAX_COUNTERS_PER_SET})")
        for k in counters:
            if not _is_label(k):
                out.append(f"{where}: counter set {cname}: counter name {k!r} is not a DNS label")
    limit = MAX_DEVICES_WITH_ADVANCED_FEATURES if any(device_uses_advanced_features(d) for d in devices) else MAX_DEVICES
    if len(devices) > limit:
        out.append(f"{where}: {len(devices)} devices in spec.devices (max {limit}"
                   f"{' because devices use taints, counters or list attributes' if limit < MAX_DEVICES else ''})")
    seen: set[str] = set()
    for d in devices:
        dname = d.get("name", "")
        dwhere = f"{where}: device {dname}"
        if not _is_label(dname):
            out.append(f"{dwhere}: name is not a DNS label")
        if dname in seen:
            out.append(f"{dwhere}: name is used twice in this slice")
        seen.add(dname)
        attrs, caps = d.get("attributes") or {}, d.get("capacity") or {}
        if len(attrs) + len(caps) > MAX_ATTRIBUTES_AND_CAPACITIES:
            out.append(f"{dwhere}: {len(attrs)} attributes + {len(caps)} capacities (max "
                       f"{MAX_ATTRIBUTES_AND_CAPACITIES} together)")
        for k, v in attrs.items():
            if not _is_qualified_name(k):
                out.append(f"{dwhere}: attribute name {k!r} is not a qualified name")
            kinds = [t for t in ("int", "bool", "string", "version", "ints", "bools", "strings", "versions") if t in v]
            if len(kinds) != 1:
                out.append(f"{dwhere}: attribute {k} must have exactly one value type (has {kinds or 'none'})")
            for t in ("string", "version"):
                if t in v and len(str(v[t])) > MAX_ATTRIBUTE_VALUE_LENGTH:
                    out.append(f"{dwhere}: attribute {k} {t} value longer than {MAX_ATTRIBUTE_VALUE_LENGTH}")
        for k in caps:
            if not _is_qualified_name(k):
                out.append(f"{dwhere}: capacity name {k!r} is not a qualified name")
        consumes = d.get("consumesCounters") or []
        if len(consumes) > MAX_CONSUMES_COUNTERS:
            out.append(f"{dwhere}: {len(consumes)} consumesCounters entries (max {MAX_CONSUMES_COUNTERS})")
        if len(d.get("taints") or []) > MAX_TAINTS:
            out.append(f"{dwhere}: more than {MAX_TAINTS} taints")
        if any("requestPolicy" in c for c in caps.values()) and not d.get("allowMultipleAllocations"):
            out.append(f"{dwhere}: capacity requestPolicy needs allowMultipleAllocations: true")
    return out


def validate_pool(slices: Iterable[dict]) -> list[str]:
    """Violations of each slice plus the pool-wide rules (unique names, counter references, counts)."""
    slices = list(slices)
    out: list[str] = []
    for s in slices:
        out.extend(validate_slice(s))
    if not slices:
        return ["pool has no slices: publish at least one (empty) slice"]
    pools = {(s["spec"]["driver"], s["spec"]["pool"]["name"]) for s in slices}
    if len(pools) != 1:
        out.append(f"slices belong to several pools {sorted(pools)}")
    gens = {s["spec"]["pool"]["generation"] for s in slices}
    counts = {s["spec"]["pool"]["resourceSliceCount"] for s in slices}
    if len(gens) != 1:
        out.append(f"slices of one pool carry different generations {sorted(gens)}")
    if counts != {len(slices)}:
        out.append(f"spec.pool.resourceSliceCount {sorted(counts)} does not match the {len(slices)} slices published")
    names: set[str] = set()
    devices: set[str] = set()
    counters: dict[str, set[str]] = {}
    for s in slices:
        n = s["metadata"]["name"]
        if n in names:
            out.append(f"slice name {n} is used twice")
        names.add(n)
        for cs in s["spec"].get("sharedCounters") or []:
            if cs["name"] in counters:
                out.append(f"counter set {cs['name']} is defined twice in the pool")
            counters[cs["name"]] = set(cs.get("counters") or {})
        for d in s["spec"].get("devices") or []:
            if d["name"] in devices:
                out.append(f"device {d['name']} is defined twice in the pool")
            devices.add(d["name"])
    for s in slices:
        for d in s["spec"].get("devices") or []:
            for c in d.get("consumesCounters") or []:
                cs = c.get("counterSet")
                if cs not in counters:
                    out.append(f"ResourceSlice {s['metadata']['name']}: device {d['name']} consumes counters of "
                               f"unknown counter set {cs!r}")
                    continue
                missing = set(c.get("counters") or {}) - counters[cs]
                if missing:
                    out.append(f"ResourceSlice {s['metadata']['name']}: device {d['name']} consumes unknown counters "
                               f"{sorted(missing)} of counter set {cs}")
    return out
