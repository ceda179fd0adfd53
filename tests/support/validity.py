"""An independent checker for allocations (tests and the allocator benchmark).

It shares no code with controller/allocator: it reads the ResourceSlices as API JSON, and the claims'
requests carry Python predicates instead of CEL (the property test only generates selectors whose meaning
it can state in Python). It checks what must hold for every set of allocations:

* every result names a published device of the right pool, on the node the allocation's nodeSelector names;
* the device matches its request (type of the class, the request's predicate) and tolerates its taints;
* no device without ``allowMultipleAllocations`` is in two results;
* shared capacity: per device, consumed memory summed over shares <= capacity, each share rounded up to the
  request policy's step and at least the request;
* counters: per counter set, what every allocated device consumes (once per device, shares included)
  <= what the set holds;
* matchAttribute constraints hold over a claim's results.

And, for single-device claims the allocator called unsatisfiable, that no device anywhere would have fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from driver.api.quantity import Quantity

Predicate = Callable[[dict], bool]      # flattened device view -> bool


@dataclass
class Dev:
    pool: str
    node: str
    name: str
    attrs: dict
    capacity: dict[str, Quantity]
    policy: dict
    consumes: dict[str, dict[str, Quantity]]
    multiple: bool
    taints: list[dict]

    def view(self) -> dict:
        return {"name": self.name, "node": self.node, **self.attrs,
                **{f"capacity.{k}": v for k, v in self.capacity.items()}}


@dataclass
class Req:
    """What a claim request asked for, in checker terms."""

    name: str
    device_type: str                      # the class: gpu | mig | shared
    predicate: Predicate = lambda _d: True
    count: int = 1
    memory: Quantity | None = None        # shared: requested memory
    tolerations: list[dict] = field(default_factory=list)
    match_attribute: str | None = None


def _attr_value(v: Mapping) -> object:
    return next(iter(v.values())) if v else None


def read_slices(slices: list[dict], driver: str) -> tuple[dict[tuple[str, str], Dev], dict[tuple[str, str], dict]]:
    devices: dict[tuple[str, str], Dev] = {}
    counters: dict[tuple[str, str], dict[str, Quantity]] = {}
    for s in slices:
        spec = s["spec"]
        if spec.get("driver") != driver:
            continue
        pool = spec["pool"]["name"]
        for cs in spec.get("sharedCounters") or []:
            counters[(pool, cs["name"])] = {k: Quantity.parse(v["value"]) for k, v in cs["counters"].items()}
        for d in spec.get("devices") or []:
            cap = {k: Quantity.parse(v["value"]) for k, v in (d.get("capacity") or {}).items()}
            policy = {k: v.get("requestPolicy") for k, v in (d.get("capacity") or {}).items() if v.get("requestPolicy")}
            consumes = {c["counterSet"]: {k: Quantity.parse(v["value"]) for k, v in c["counters"].items()}
                        for c in d.get("consumesCounters") or []}
            devices[(pool, d["name"])] = Dev(pool, spec.get("nodeName", ""), d["name"],
                                             {k: _attr_value(v) for k, v in (d.get("attributes") or {}).items()},
                                             cap, policy, consumes, bool(d.get("allowMultipleAllocations")),
                                             list(d.get("taints") or []))
    return devices, counters


def _tolerated(taint: Mapping, tolerations: list[Mapping]) -> bool:
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        op = t.get("operator", "Equal")
        if not t.get("key"):
            if op == "Exists":
                return True
            continue
        if t["key"] != taint.get("key"):
            continue
        if op == "Exists" or t.get("value", "") == taint.get("value", ""):
            return True
    return False


def taints_ok(dev: Dev, tolerations: list[Mapping]) -> bool:
    return all(t.get("effect") not in ("NoSchedule", "NoExecute") or _tolerated(t, tolerations) for t in dev.taints)


def rounded_share(dev: Dev, requested: Quantity) -> Quantity:
    """The memory a share of ``requested`` consumes under the device's request policy."""
    policy = dev.policy.get("memory") or {}
    rng = policy.get("validRange")
    if rng:
        lo = Quantity.parse(rng["min"])
        step = Quantity.parse(rng["step"]) if rng.get("step") else None
        if requested < lo:
            return lo
        if step is not None and step.as_int() > 0:
            extra = (requested - lo).as_int()
            steps = -(-extra // step.as_int())
            return Quantity.parse(lo.as_int() + steps * step.as_int())
    return requested


def _node_of(allocation: Mapping) -> str | None:
    for term in ((allocation.get("nodeSelector") or {}).get("nodeSelectorTerms") or []):
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("values"):
                return f["values"][0]
    return None


def check(slices: list[dict], driver: str, allocations: list[tuple[list[Req], dict]]) -> list[str]:
    """Problems with the allocations (empty when all is well). ``allocations``: per claim, its requests
    and the AllocationResult the allocator returned."""
    devices, counters = read_slices(slices, driver)
    problems: list[str] = []
    dedicated: dict[tuple[str, str], int] = {}
    shared_use: dict[tuple[str, str], Quantity] = {}
    used: set[tuple[str, str]] = set()
    for ci, (reqs, alloc) in enumerate(allocations):
        by_name = {r.name: r for r in reqs}
        node = _node_of(alloc)
        results = alloc["devices"]["results"]
        per_req: dict[str, list[Dev]] = {}
        for r in results:
            key = (r["pool"], r["device"])
            d = devices.get(key)
            req = by_name.get(r["request"].split("/")[0])
            where = f"claim {ci} request {r['request']} device {r['pool']}/{r['device']}"
            if d is None:
                problems.append(f"{where}: not published")
                continue
            if req is None:
                problems.append(f"{where}: unknown request")
                continue
            per_req.setdefault(req.name, []).append(d)
            if node is not None and d.node != node:
                problems.append(f"{where}: on node {d.node} but the allocation's nodeSelector names {node}")
            if d.attrs.get("type") != req.device_type:
                problems.append(f"{where}: type {d.attrs.get('type')} but the class wants {req.device_type}")
            if not req.predicate(d.view()):
                problems.append(f"{where}: does not satisfy the request's selector")
            if not taints_ok(d, req.tolerations):
                problems.append(f"{where}: has an untolerated taint {d.taints}")
            used.add(key)
            if d.multiple:
                consumed = Quantity.parse(((r.get("consumedCapacity") or {}).get("memory")) or 0)
                if req.memory is not None:
                    want = rounded_share(d, req.memory)
                    if consumed != want:
                        problems.append(f"{where}: consumed {consumed} for a request of {req.memory}; the policy gives {want}")
                if not r.get("shareID"):
                    problems.append(f"{where}: a share without shareID")
                shared_use[key] = shared_use.get(key, Quantity.parse(0)) + consumed
            else:
                dedicated[key] = dedicated.get(key, 0) + 1
        for name, req in by_name.items():
            got = per_req.get(name, [])
            if len(got) != req.count:
                problems.append(f"claim {ci} request {name}: {len(got)} devices, wanted {req.count}")
            if req.match_attribute and len({repr(d.attrs.get(req.match_attribute)) for d in got}) > 1:
                problems.append(f"claim {ci} request {name}: devices differ in {req.match_attribute}")
    for key, n in dedicated.items():
        if n > 1:
            problems.append(f"device {key[0]}/{key[1]} is allocated {n} times")
        if key in shared_use:
            problems.append(f"device {key[0]}/{key[1]} is both dedicated and shared")
    for key, total in shared_use.items():
        cap = devices[key].capacity.get("memory")
        if cap is not None and total > cap:
            problems.append(f"device {key[0]}/{key[1]}: shares consume {total} of {cap} memory")
    for (pool, cs), have in consumed_counters(devices, used).items():
        limit = counters.get((pool, cs))
        if limit is None:
            problems.append(f"counter set {pool}/{cs} is not published")
            continue
        for counter, v in have.items():
            if v > limit.get(counter, Quantity.parse(0)):
                problems.append(f"counter {pool}/{cs}/{counter}: {v} consumed of {limit.get(counter)}")
    return problems


def consumed_counters(devices: Mapping[tuple[str, str], Dev], used: set[tuple[str, str]]) -> dict:
    out: dict[tuple[str, str], dict[str, Quantity]] = {}
    for key in used:
        d = devices[key]
        for cs, cnt in d.consumes.items():
            acc = out.setdefault((d.pool, cs), {})
            for k, v in cnt.items():
                acc[k] = acc.get(k, Quantity.parse(0)) + v
    return out


def any_single_fit(slices: list[dict], driver: str, allocations: list[tuple[list[Req], dict]], req: Req,
                   nodes: set[str] | None = None) -> str | None:
    """For a one-device request: a device that would fit given what is allocated, or None."""
    devices, counters = read_slices(slices, driver)
    used: set[tuple[str, str]] = set()
    shared_use: dict[tuple[str, str], Quantity] = {}
    for _, alloc in allocations:
        for r in alloc["devices"]["results"]:
            key = (r["pool"], r["device"])
            used.add(key)
            if devices[key].multiple:
                q = Quantity.parse(((r.get("consumedCapacity") or {}).get("memory")) or 0)
                shared_use[key] = shared_use.get(key, Quantity.parse(0)) + q
    consumed = consumed_counters(devices, used)
    for key, d in devices.items():
        if nodes is not None and d.node not in nodes:
            continue
        if d.attrs.get("type") != req.device_type or not req.predicate(d.view()) or not taints_ok(d, req.tolerations):
            continue
        if d.multiple:
            need = rounded_share(d, req.memory or Quantity.parse(0))
            if shared_use.get(key, Quantity.parse(0)) + need > d.capacity.get("memory", need):
                continue
        elif key in used:
            continue
        if key not in used:
            fits = True
            for cs, cnt in d.consumes.items():
                have = consumed.get((d.pool, cs), {})
                limit = counters[(d.pool, cs)]
                if any(have.get(k, Quantity.parse(0)) + v > limit.get(k, Quantity.parse(0)) for k, v in cnt.items()):
                    fits = False
                    break
            if not fits:
                continue
        return f"{d.pool}/{d.name}"
    return None
