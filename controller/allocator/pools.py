"""ResourceSlices compiled once, and the pools a node can allocate from (upstream ``GatherPools``,
incubating variant: pools sorted by driver/pool, slices by name, pools with binding conditions last).

:class:`SliceIndex` keeps the cluster's slices; each slice is compiled once per resourceVersion into
compact device records that also carry cached selector results, so repeated allocations over a large
cluster only pay for the candidate node's pools.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable

from driver.api.quantity import Quantity, QuantityError

from .nodeselector import node_matches
from .types import DeviceID, Node


def _q(text: Any) -> Fraction:
    return Quantity.parse(text).value


@dataclass(eq=False)
class CDevice:
    """One device of a slice, compiled."""

    id: DeviceID
    raw: dict
    slice: "CSlice"
    consumes: tuple[tuple[str, tuple[tuple[str, Fraction], ...]], ...]
    taints: tuple[dict, ...]
    allow_multiple: bool
    capacity: dict[str, tuple[Quantity, dict | None]]
    has_binding_conditions: bool
    binds_to_node: bool
    type: str | None = None          # Partita's "type" attribute (gpu, mig, shared), for strategies
    parent: str | None = None        # the physical GPU (uuid / parentUUID), for strategies
    mig_profile: str | None = None
    mig_placement: int | None = None
    cel_input: Any = None            # built lazily (dict, or the CelRuntimeError it raised)
    matches: dict = field(default_factory=dict)   # selector expression -> bool | error

    @property
    def name(self) -> str:
        return self.id.device


@dataclass(eq=False)
class CSlice:
    name: str
    resource_version: str
    raw: dict
    driver: str
    pool: str
    generation: int
    count: int
    node_name: str
    all_nodes: bool
    node_selector: dict | None
    per_device: bool
    devices: list[CDevice]
    shared_counters: dict[str, dict[str, Fraction]]
    error: str = ""


def compile_slice(raw: dict) -> CSlice:
    md, spec = raw.get("metadata") or {}, raw.get("spec") or {}
    pool = spec.get("pool") or {}
    s = CSlice(
        name=md.get("name", ""), resource_version=str(md.get("resourceVersion", "")), raw=raw,
        driver=spec.get("driver", ""), pool=pool.get("name", ""), generation=int(pool.get("generation", 0)),
        count=int(pool.get("resourceSliceCount", 0)), node_name=spec.get("nodeName") or "",
        all_nodes=bool(spec.get("allNodes")), node_selector=spec.get("nodeSelector"),
        per_device=bool(spec.get("perDeviceNodeSelection")), devices=[], shared_counters={})
    try:
        for cs in spec.get("sharedCounters") or []:
            s.shared_counters[cs["name"]] = {k: _q(v["value"]) for k, v in (cs.get("counters") or {}).items()}
        for d in spec.get("devices") or []:
            s.devices.append(_compile_device(s, d))
    except (QuantityError, KeyError, TypeError, ValueError) as e:
        s.error = f"ResourceSlice {s.name}: {e}"
    return s


def _compile_device(s: CSlice, d: dict) -> CDevice:
    attrs = d.get("attributes") or {}

    def attr(name: str) -> Any:
        v = attrs.get(name) or attrs.get(f"{s.driver}/{name}") or {}
        return v.get("string", v.get("int"))

    consumes = tuple((c["counterSet"], tuple((k, _q(v["value"])) for k, v in (c.get("counters") or {}).items()))
                     for c in d.get("consumesCounters") or [])
    capacity = {k: (Quantity.parse(v["value"]), v.get("requestPolicy")) for k, v in (d.get("capacity") or {}).items()}
    return CDevice(
        id=DeviceID(s.driver, s.pool, d["name"]), raw=d, slice=s, consumes=consumes,
        taints=tuple(d.get("taints") or ()), allow_multiple=bool(d.get("allowMultipleAllocations")),
        capacity=capacity, has_binding_conditions=bool(d.get("bindingConditions")),
        binds_to_node=bool(d.get("bindsToNode")), type=attr("type"),
        parent=attr("parentUUID") or attr("uuid"), mig_profile=attr("migProfile"), mig_placement=attr("migPlacement"))


@dataclass(eq=False)
class Pool:
    driver: str
    name: str
    incomplete: bool = False
    invalid: bool = False
    invalid_reason: str = ""
    slices: list[CSlice] = field(default_factory=list)            # device slices targeting the node
    other_slices: list[CSlice] = field(default_factory=list)      # device slices of the pool not targeting it
    counter_sets: dict[str, dict[str, Fraction]] = field(default_factory=dict)
    has_binding_conditions: bool = False

    @property
    def id(self) -> tuple[str, str]:
        return (self.driver, self.name)

    def __str__(self) -> str:
        return f"{self.driver}/{self.name}"

    def devices(self) -> Iterable[CDevice]:
        for s in self.slices:
            yield from s.devices

    def all_devices(self) -> Iterable[CDevice]:
        for s in self.slices + self.other_slices:
            yield from s.devices


class SliceIndex:
    """All ResourceSlices the allocator knows, compiled once per resourceVersion."""

    def __init__(self) -> None:
        self._slices: dict[str, CSlice] = {}
        self._node_local: dict[str, set[str]] = {}
        self._other: set[str] = set()            # slices without spec.nodeName
        self._by_pool: dict[tuple[str, str], set[str]] = {}
        self._pool_cache: dict[tuple[str, str], tuple[tuple, Pool]] = {}
        self.version = 0

    @classmethod
    def from_slices(cls, slices: Iterable[dict]) -> "SliceIndex":
        idx = cls()
        for s in slices:
            idx.upsert(s)
        return idx

    def __len__(self) -> int:
        return len(self._slices)

    def upsert(self, raw: dict) -> None:
        name = (raw.get("metadata") or {}).get("name", "")
        old = self._slices.get(name)
        rv = str((raw.get("metadata") or {}).get("resourceVersion", ""))
        if old is not None and rv and old.resource_version == rv and old.raw == raw:
            return
        if old is not None:
            self._unlink(old)
        s = compile_slice(raw)
        self._slices[name] = s
        if s.node_name:
            self._node_local.setdefault(s.node_name, set()).add(name)
        else:
            self._other.add(name)
        self._by_pool.setdefault((s.driver, s.pool), set()).add(name)
        self.version += 1

    def delete(self, name: str) -> None:
        old = self._slices.pop(name, None)
        if old is not None:
            self._unlink(old)
            self.version += 1

    def _unlink(self, s: CSlice) -> None:
        if s.node_name:
            self._node_local.get(s.node_name, set()).discard(s.name)
        else:
            self._other.discard(s.name)
        self._by_pool.get((s.driver, s.pool), set()).discard(s.name)

    def slices(self) -> list[CSlice]:
        return list(self._slices.values())

    def slice(self, name: str) -> CSlice | None:
        return self._slices.get(name)

    def node_names(self) -> list[str]:
        return sorted(n for n, names in self._node_local.items() if names)

    def pools_for_node(self, node: Node, partitionable_devices: bool = True) -> list[Pool]:
        """The pools whose devices ``node`` can use, per upstream GatherPools (incubating)."""
        candidates: dict[tuple[str, str], list[CSlice]] = {}
        names = list(self._node_local.get(node.name, ())) + list(self._other)
        for name in names:
            s = self._slices[name]
            if not partitionable_devices and (s.per_device or s.shared_counters):
                continue
            if s.node_name or s.all_nodes or s.node_selector is not None:
                relevant = _node_fits(node, s.node_name, s.all_nodes, s.node_selector)
            elif s.per_device:
                relevant = any(_node_fits(node, d.raw.get("nodeName") or "", bool(d.raw.get("allNodes")),
                                          d.raw.get("nodeSelector")) for d in s.devices)
            else:
                continue
            if not relevant:
                continue
            group = candidates.setdefault((s.driver, s.pool), [])
            if group and s.generation < group[0].generation:
                continue
            if group and s.generation > group[0].generation:
                group.clear()
            group.append(s)
        pools: list[Pool] = []
        with_binding: list[Pool] = []
        for pid, group in candidates.items():
            pool = self._pool(pid, group, partitionable_devices)
            if pool is None:
                continue
            (with_binding if pool.has_binding_conditions else pools).append(pool)
        pools.sort(key=lambda p: (p.driver, p.name))
        with_binding.sort(key=lambda p: (p.driver, p.name))
        return pools + with_binding

    def _pool(self, pid: tuple[str, str], group: list[CSlice], partitionable: bool) -> Pool | None:
        gen = group[0].generation
        all_of_pool = [self._slices[n] for n in self._by_pool.get(pid, ())]
        if len(group) != group[0].count:
            if any(s.generation > gen for s in all_of_pool):
                return None                                  # obsolete
            same_gen = [s for s in all_of_pool if s.generation == gen]
            if len(same_gen) != group[0].count:
                return Pool(pid[0], pid[1], incomplete=True)
            others = [s for s in same_gen if s not in group]
        else:
            others = []
        key = (partitionable, tuple(sorted((s.name, s.resource_version) for s in group)),
               tuple(sorted((s.name, s.resource_version) for s in others)))
        cached = self._pool_cache.get(pid)
        if cached is not None and cached[0] == key:
            return cached[1]
        pool = _build_pool(pid, sorted(group, key=lambda s: s.name), sorted(others, key=lambda s: s.name), partitionable)
        self._pool_cache[pid] = (key, pool)
        return pool


def _node_fits(node: Node, node_name: str, all_nodes: bool, selector: dict | None) -> bool:
    if node_name:
        return node.name == node_name
    if all_nodes:
        return True
    if selector is not None:
        return node_matches(node, selector)
    return False


def _build_pool(pid: tuple[str, str], slices: list[CSlice], others: list[CSlice], partitionable: bool) -> Pool:
    pool = Pool(pid[0], pid[1])
    device_slices, counter_slices, other_devices = [], [], []
    for s in slices:
        (counter_slices if partitionable and s.shared_counters else device_slices).append(s)
    for s in others:
        (counter_slices if partitionable and s.shared_counters else other_devices).append(s)
    for s in slices + others:
        if s.error:
            pool.invalid, pool.invalid_reason = True, s.error
            return pool
    seen: set[str] = set()
    for s in device_slices:
        for d in s.devices:
            if d.name in seen:
                pool.invalid, pool.invalid_reason = True, f"duplicate device name {d.name}"
                return pool
            seen.add(d.name)
    pool.slices = device_slices
    pool.has_binding_conditions = any(d.has_binding_conditions for s in device_slices for d in s.devices)
    if not partitionable:
        return pool
    for s in counter_slices:
        for name, counters in s.shared_counters.items():
            if name in pool.counter_sets:
                pool.invalid, pool.invalid_reason = True, f"duplicate counter set name {name}"
                return pool
            pool.counter_sets[name] = counters
    for s in device_slices + other_devices:
        for d in s.devices:
            for cs, counters in d.consumes:
                if cs not in pool.counter_sets:
                    pool.invalid, pool.invalid_reason = True, f"counter set {cs} not found"
                    return pool
                for c, _ in counters:
                    if c not in pool.counter_sets[cs]:
                        pool.invalid, pool.invalid_reason = True, f"counter {c} not found in counter set {cs}"
                        return pool
    pool.other_slices = other_devices
    return pool
