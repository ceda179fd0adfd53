"""ResourceSlices compiled once, and the pools a node can allocate from (upstream ``GatherPools``,
incubating variant: pools sorted by driver/pool, slices by name, pools with binding conditions last).

:class:`SliceIndex` keeps the cluster's slices; each slice is compiled once per resourceVersion into
compact device records that also carry cached selector results, so repeated allocations over a large
cluster only pay for the candidate node's pools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from driver.api.quantity import Quantity, QuantityError

from .nodeselector import node_matches
from .types import AllocatedState, DeviceID, Node


class Interner:
    """Shares equal values between compiled devices (a cluster repeats the same attributes, capacities
    and counter consumptions on every GPU of a model), and caches parsed quantities."""

    def __init__(self) -> None:
        self._values: dict[Any, Any] = {}
        self._quantities: dict[Any, Quantity] = {}

    def __call__(self, value: Any) -> Any:
        return self._values.setdefault(value, value)

    def quantity(self, text: Any) -> Quantity:
        q = self._quantities.get(text)
        if q is None:
            q = self._quantities[text] = Quantity.parse(text)
        return q

    def fraction(self, text: Any) -> int:
        """A counter value in integer nano-units (exact for every quantity Kubernetes prints)."""
        return to_nano(self.quantity(text))

    def shared_dict(self, value: dict) -> dict:
        """One shared (never mutated) dict per distinct value."""
        return self._values.setdefault(("dict", _freeze(value)), value)


def to_nano(q: Quantity) -> int:
    return math.ceil(q.value * 1_000_000_000)


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def thaw(v: Any) -> Any:
    """Inverse of the freezing of small JSON values (tuples of pairs back into dicts)."""
    if isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v) and v:
        return {k: thaw(x) for k, x in v}
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    return v


class CDevice:
    """One device of a slice, compiled compactly (no raw JSON is kept)."""

    __slots__ = ("id", "slice", "attrs", "capacity", "consumes", "taints", "allow_multiple", "binding",
                 "binds_to_node", "node_selection", "type", "parent", "mig_profile", "mig_placement", "matches",
                 "pool_index")

    def __init__(self, id: DeviceID, slice: "CSlice", attrs: tuple, capacity: tuple, consumes: tuple,  # noqa: A002
                 taints: tuple, allow_multiple: bool, binding: tuple | None, binds_to_node: bool,
                 node_selection: tuple | None):
        self.id = id
        self.slice = slice
        self.attrs = attrs                    # ((qualified name, kind, value), ...)
        self.capacity = capacity              # ((name, Quantity, requestPolicy dict | None), ...)
        self.consumes = consumes              # ((counter set, ((counter, nano-units int), ...)), ...)
        self.taints = taints                  # (taint dict, ...), shared and never mutated
        self.allow_multiple = allow_multiple
        self.binding = binding                # (bindingConditions, bindingFailureConditions) or None
        self.binds_to_node = binds_to_node
        self.node_selection = node_selection  # (nodeName, allNodes, frozen nodeSelector) with perDeviceNodeSelection
        self.matches: dict | None = None      # selector expression -> bool | CelError
        self.pool_index = 0
        self.type = self.parent = self.mig_profile = self.mig_placement = None
        for name, kind, value in attrs:
            short = name.rpartition("/")[2] if name.startswith(id.driver + "/") else name
            if short == "type":
                self.type = value
            elif short in ("parentUUID", "uuid") and (self.parent is None or short == "parentUUID"):
                self.parent = value
            elif short == "migProfile":
                self.mig_profile = value
            elif short == "migPlacement":
                self.mig_placement = value

    @property
    def name(self) -> str:
        return self.id.device

    @property
    def has_binding_conditions(self) -> bool:
        return bool(self.binding and self.binding[0])

    def attribute_dict(self) -> dict[str, dict]:
        """Attributes in API form (``{"name": {"string": "x"}}``)."""
        return {name: {kind: value} for name, kind, value in self.attrs}



@dataclass(eq=False)
class CSlice:
    name: str
    resource_version: str
    driver: str
    pool: str
    generation: int
    count: int
    node_name: str
    all_nodes: bool
    node_selector: dict | None
    per_device: bool
    devices: list[CDevice]
    shared_counters: dict[str, dict[str, int]]
    error: str = ""


def compile_slice(raw: dict, intern: Interner | None = None) -> CSlice:
    intern = intern or Interner()
    md, spec = raw.get("metadata") or {}, raw.get("spec") or {}
    pool = spec.get("pool") or {}
    s = CSlice(
        name=md.get("name", ""), resource_version=str(md.get("resourceVersion", "")),
        driver=intern(spec.get("driver", "")), pool=intern(pool.get("name", "")),
        generation=int(pool.get("generation", 0)), count=int(pool.get("resourceSliceCount", 0)),
        node_name=intern(spec.get("nodeName") or ""), all_nodes=bool(spec.get("allNodes")),
        node_selector=spec.get("nodeSelector"), per_device=bool(spec.get("perDeviceNodeSelection")),
        devices=[], shared_counters={})
    try:
        for cs in spec.get("sharedCounters") or []:
            s.shared_counters[cs["name"]] = {k: intern.fraction(v["value"]) for k, v in (cs.get("counters") or {}).items()}
        for d in spec.get("devices") or []:
            s.devices.append(_compile_device(s, d, intern))
    except (QuantityError, KeyError, TypeError, ValueError) as e:
        s.error = f"ResourceSlice {s.name}: {e}"
    return s


def _compile_device(s: CSlice, d: dict, intern: Interner) -> CDevice:
    attrs = []
    for name, val in sorted((d.get("attributes") or {}).items()):
        kinds = [k for k in ("int", "bool", "string", "version") if k in val]
        kind = kinds[0] if kinds else ""
        attrs.append(intern((intern(name), kind, _freeze(val.get(kind)) if kind else None)))
    capacity = tuple((intern(k), intern.quantity(v["value"]),
                      intern.shared_dict(v["requestPolicy"]) if v.get("requestPolicy") else None)
                     for k, v in sorted((d.get("capacity") or {}).items()))
    consumes = intern(tuple((intern(c["counterSet"]), intern(tuple(sorted(
        (intern(k), intern.fraction(v["value"])) for k, v in (c.get("counters") or {}).items()))))
        for c in d.get("consumesCounters") or []))
    taints = tuple(intern.shared_dict(t) for t in d.get("taints") or ())
    binding = None
    if d.get("bindingConditions") or d.get("bindingFailureConditions"):
        binding = (tuple(d.get("bindingConditions") or ()), tuple(d.get("bindingFailureConditions") or ()))
    node_sel = None
    if s.per_device:
        node_sel = (d.get("nodeName") or "", bool(d.get("allNodes")), _freeze(d.get("nodeSelector")))
    return CDevice(DeviceID(s.driver, s.pool, d["name"]), s, intern(tuple(attrs)), capacity, consumes, taints,
                   bool(d.get("allowMultipleAllocations")), binding, bool(d.get("bindsToNode")), node_sel)


@dataclass(eq=False)
class Pool:
    driver: str
    name: str
    incomplete: bool = False
    invalid: bool = False
    invalid_reason: str = ""
    slices: list[CSlice] = field(default_factory=list)            # device slices targeting the node
    other_slices: list[CSlice] = field(default_factory=list)      # device slices of the pool not targeting it
    counter_sets: dict[str, dict[str, int]] = field(default_factory=dict)
    has_binding_conditions: bool = False
    #: class selector expressions -> devices passing them (or the selector failure), see Run.class_list
    class_cache: dict = field(default_factory=dict)
    #: (allocated-state pool signature, available counters), see Run._available
    available_cache: tuple | None = None
    #: per-strategy data derived from the devices alone (e.g. MIG placement masks)
    strategy_cache: dict = field(default_factory=dict)
    #: every device of the pool (targeting the node or not) by name
    by_name: dict[str, CDevice] = field(default_factory=dict)

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
        self._intern = Interner()
        self._node_version: dict[str, int] = {}
        self._node_pools: dict[str, tuple[int, tuple[tuple[str, str], ...]]] = {}
        self._other_version = 0
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
        if old is not None and rv and old.resource_version == rv:
            return
        if old is not None:
            self._unlink(old)
        s = compile_slice(raw, self._intern)
        self._slices[name] = s
        if s.node_name:
            self._node_local.setdefault(s.node_name, set()).add(name)
        else:
            self._other.add(name)
        self._bump(s)
        self._by_pool.setdefault((s.driver, s.pool), set()).add(name)
        self.version += 1

    def delete(self, name: str) -> None:
        old = self._slices.pop(name, None)
        if old is not None:
            self._unlink(old)
            self.version += 1

    def _bump(self, s: CSlice) -> None:
        if s.node_name:
            self._node_version[s.node_name] = self._node_version.get(s.node_name, 0) + 1
        else:
            self._other_version += 1

    def node_key(self, node_name: str) -> tuple[int, int]:
        """Changes whenever a slice this node may use changes (for caches keyed by node)."""
        return (self._node_version.get(node_name, 0), self._other_version)

    def pool_node(self, driver: str, pool: str) -> str | None:
        """The node whose slices make up a node-local pool (Partita's pools are named after it)."""
        for n in self._by_pool.get((driver, pool), ()):
            s = self._slices[n]
            if s.node_name:
                return s.node_name
        return None

    def pool_node_names(self, driver: str, pool: str) -> set[str] | None:
        """The nodes that may use the pool's devices: those with a slice of it published for them by name
        (whose :meth:`node_pool_ids` include it); None when a slice of the pool has no ``nodeName`` (it may
        target any node)."""
        out = set()
        for n in self._by_pool.get((driver, pool), ()):
            node_name = self._slices[n].node_name
            if not node_name:
                return None
            out.add(node_name)
        return out

    def node_pool_ids(self, node_name: str) -> tuple[tuple[str, str], ...]:
        """Pools with slices published for this node by name (cheap; no node selectors evaluated)."""
        key = self._node_version.get(node_name, 0)
        got = self._node_pools.get(node_name)
        if got is None or got[0] != key:
            ids = tuple(sorted({(self._slices[n].driver, self._slices[n].pool)
                                for n in self._node_local.get(node_name, ())}))
            got = self._node_pools[node_name] = (key, ids)
        return got[1]

    def _unlink(self, s: CSlice) -> None:
        self._bump(s)
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
                relevant = any(d.node_selection is not None and _node_fits(
                    node, d.node_selection[0], d.node_selection[1], thaw(d.node_selection[2]) if d.node_selection[2] else None)
                    for d in s.devices)
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
    pool.by_name = {d.name: d for s in device_slices for d in s.devices}
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
    pool.by_name = {d.name: d for d in pool.all_devices()}
    return pool


def available_counters(pool: Pool, allocated: "AllocatedState") -> dict[str, dict[str, int]]:
    """Counters of the pool left by devices other claims hold (never mutate the result). Cached on the
    pool by the allocated state's content signature for the pool."""
    sig = allocated.pool_signature(pool.driver, pool.name)
    if pool.available_cache is not None and pool.available_cache[0] == sig:
        return pool.available_cache[1]
    got = {name: dict(counters) for name, counters in pool.counter_sets.items()}
    for name in allocated.allocated_in_pool(pool.driver, pool.name):
        dev = pool.by_name.get(name)
        if dev is not None and dev.consumes:
            for cs, counters in dev.consumes:
                avail = got.get(cs)
                if avail is None:
                    continue
                for c, v in counters:
                    if c in avail:
                        avail[c] -= v
    pool.available_cache = (sig, got)
    return got
