"""Cluster capacity: per node and mode, GPUs and memory total / allocated / free, why pending claims wait,
and the free capacity nobody waiting can use (fragmentation). Issue 14, item 3.

One computation, :func:`compute`, pure over API objects (ResourceSlices, ResourceClaims, Pods, DeviceClasses as
the API server sends them), feeds both the controller's gauges (:class:`CapacityGauges`) and ``partita status``
(``controller/status.py``), so the command and the metrics show the same numbers.

Definitions (also in docs/monitoring-cluster.md):

* A **GPU** is a whole-GPU device (``type: gpu``) of our driver; MIG and shared devices belong to the GPU whose
  ``uuid`` their ``parentUUID`` names. Without partitionable devices (static MIG) a MIG-enabled GPU is published
  only as its existing MIG devices: it is then known by their ``parentUUID``, with their memory. Its **mode** is what its allocated devices are: ``whole``, ``mig``,
  ``shared``, or none (free).
* A device is **placeable** when one more allocation of it is possible now: not held (a dedicated device), its
  counters fit beside what the GPU's allocated devices consume (a multi-allocatable device is charged once,
  on its first share, as the allocator does), its GPU is free or in the device's mode, it carries no taint but
  Partita's managed one (an unhealthy device's taint, as published), and for a shared device some memory is
  left.
* Per node and mode: ``total`` GPUs publishing a device of that mode and their memory; ``allocated`` GPUs in
  that mode and the memory allocated to such devices (a whole GPU's memory, a MIG device's memory, a share's
  consumed memory); ``free`` GPUs with a placeable device of that mode and the memory such a device could still
  use (a free GPU's memory for whole, the GPU's unallocated memory for MIG, the shared device's unconsumed
  memory for shared). ``total`` is therefore not ``allocated + free``: a GPU in MIG mode counts in neither
  ``whole`` state.
* A **pending claim** is an unallocated claim of ours (every request uses a Partita DeviceClass) that a pending
  pod references. Its reason, first that applies: ``InvalidConfig`` (a GpuConfig the plugin would refuse),
  ``NoMatchingDevices`` (no published device matches a request's class and selectors), ``InsufficientCapacity``
  (no node has enough free capacity of the matching kind), ``Fragmented`` (a node has enough free memory on
  matching GPUs, but no placement can use it), ``Unschedulable`` (capacity exists: node fit, constraints, taints
  or a retry in progress keep it; the controller's Event says which).
* **Fragmented** capacity, per node and mode: GPUs with free memory and a device matching the smallest pending
  request of that mode that cannot take that request, and their free memory. Zero where nothing of that mode
  waits: capacity is only fragmented for someone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from prometheus_client import Gauge

from controller.allocator.cel import CelError, Evaluator
from controller.allocator.pools import Interner
from driver.api import constants as C
from driver.api.config import validate_claim_configs
from driver.api.quantity import QuantityError

from .claims import is_partita_class, is_pending, key, ownership, pod_claims

log = logging.getLogger(__name__)

MODE_WHOLE, MODE_MIG, MODE_SHARED = "whole", "mig", "shared"
MODES = (MODE_WHOLE, MODE_MIG, MODE_SHARED)
TYPE_MODE = {C.DEVICE_TYPE_GPU: MODE_WHOLE, C.DEVICE_TYPE_MIG: MODE_MIG, C.DEVICE_TYPE_SHARED: MODE_SHARED}
STATES = ("total", "allocated", "free")

REASON_INVALID_CONFIG = "InvalidConfig"
REASON_NO_MATCH = "NoMatchingDevices"
REASON_INSUFFICIENT = "InsufficientCapacity"
REASON_FRAGMENTED = "Fragmented"
REASON_UNSCHEDULABLE = "Unschedulable"
#: every reason a pending claim can have (a bounded label set), worst first
REASONS = (REASON_INVALID_CONFIG, REASON_NO_MATCH, REASON_INSUFFICIENT, REASON_FRAGMENTED, REASON_UNSCHEDULABLE)

#: the controller recomputes its gauges at most this often (seconds)
DEFAULT_REFRESH_SECONDS = 15.0


# -- model ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class Device:
    pool: str
    name: str
    mode: str
    gpu_uuid: str
    memory: int                                   # bytes of its memory capacity
    allow_multiple: bool
    share_default: int                            # the shared device's requestPolicy default (bytes), or 0
    raw: Mapping                                  # the published device (counters and selector inputs, parsed lazily)
    tainted: bool = False                         # a taint other than Partita's managed one keeps it from claims
    _counters: tuple[tuple[str, str, int], ...] | None = None   # (counter set, counter, nano-units) it consumes
    _cel: tuple[tuple, tuple] | None = None                     # (attributes, capacities) for selectors
    held: bool = False                            # a dedicated device allocated to a claim
    consumed: int = 0                             # a shared device's memory consumed by its shares
    shares: int = 0


@dataclass(eq=False)
class Gpu:
    node: str
    pool: str
    uuid: str
    device: str                                   # the whole-GPU device's name ("" for a static MIG GPU)
    model: str
    memory: int
    devices: list[Device] = field(default_factory=list)
    mode: str | None = None                       # whole | mig | shared | None (free)
    allocated: int = 0                            # bytes allocated to its devices

    @property
    def free_memory(self) -> int:
        return max(self.memory - self.allocated, 0)

    def modes(self) -> set[str]:
        return {d.mode for d in self.devices}


@dataclass
class ModeCapacity:
    gpus_total: int = 0
    gpus_allocated: int = 0
    gpus_free: int = 0
    memory_total: int = 0
    memory_allocated: int = 0
    memory_free: int = 0
    fragmented_gpus: int = 0
    fragmented_memory: int = 0

    def add(self, other: "ModeCapacity") -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    def gpus(self, state: str) -> int:
        return getattr(self, f"gpus_{state}")

    def memory(self, state: str) -> int:
        return getattr(self, f"memory_{state}")


@dataclass
class PendingClaim:
    namespace: str
    name: str
    pods: list[str]                               # pending pods (namespace/name) waiting for it
    reason: str
    mode: str | None                              # of the request that decides the reason, when known
    memory: int                                   # that request's per-device memory (bytes), when known


@dataclass
class PendingPod:
    namespace: str
    name: str
    reason: str                                   # the worst of its pending claims' reasons
    claims: list[str]                             # its pending claims (namespace/name)


@dataclass
class Capacity:
    nodes: dict[str, dict[str, ModeCapacity]]
    gpus: list[Gpu]
    pending_claims: list[PendingClaim]
    pending_pods: list[PendingPod]

    def total(self) -> dict[str, ModeCapacity]:
        out = {m: ModeCapacity() for m in MODES}
        for per_mode in self.nodes.values():
            for m, c in per_mode.items():
                out[m].add(c)
        return out

    def pending_by_reason(self) -> dict[str, int]:
        out = {r: 0 for r in REASONS}
        for c in self.pending_claims:
            out[c.reason] += 1
        return out


# -- helpers ------------------------------------------------------------------------------------------
def _attr(device: Mapping, name: str) -> object:
    v = (device.get("attributes") or {}).get(name) or {}
    return next(iter(v.values()), None) if v else None


_QUANTITIES = (QuantityError, ValueError, TypeError)


def _bytes(intern: Interner, text: object) -> int:
    if text in (None, ""):
        return 0
    try:
        return intern.quantity(text).as_int()
    except _QUANTITIES:
        return 0


def _cel_inputs(intern: Interner, d: Mapping) -> tuple[tuple, tuple]:
    """A device's attributes as ``(name, kind, value)`` and capacities as ``(name, Quantity)``, the shape the
    allocator's CEL evaluator memoizes on."""
    attrs = []
    for name, val in (d.get("attributes") or {}).items():
        kind = next((k for k in ("int", "bool", "string", "version") if k in (val or {})), "")
        attrs.append((name, kind, (val or {}).get(kind)))
    caps = []
    for name, c in (d.get("capacity") or {}).items():
        try:
            caps.append((name, intern.quantity((c or {}).get("value"))))
        except _QUANTITIES:
            continue
    return tuple(attrs), tuple(caps)


def _results(claim: Mapping, driver: str) -> list[Mapping]:
    alloc = (claim.get("status") or {}).get("allocation") or {}
    return [r for r in ((alloc.get("devices") or {}).get("results") or [])
            if r.get("driver") == driver and not r.get("adminAccess")]     # admin access is no allocation


class _Inventory:
    """Our published devices, their GPUs, and what the claims' allocations hold."""

    def __init__(self, slices: Iterable[Mapping], claims: Iterable[Mapping], driver: str):
        self.driver = driver
        intern = self.intern = Interner()
        self._nanos: dict[object, int] = {}
        self.gpus: dict[tuple[str, str], Gpu] = {}               # (pool, uuid) -> GPU
        self.devices: dict[tuple[str, str], Device] = {}         # (pool, device name) -> device
        self.counter_caps: dict[tuple[str, str, str], int] = {}  # (pool, set, counter) -> nano-units
        self.counter_used: dict[tuple[str, str, str], int] = {}
        pending_devices: list[tuple[Mapping, str, str]] = []
        for s in slices:
            spec = s.get("spec") or {}
            if spec.get("driver") != driver:
                continue
            pool = (spec.get("pool") or {}).get("name", "")
            node = spec.get("nodeName") or pool
            for cs in spec.get("sharedCounters") or []:
                for cname, v in (cs.get("counters") or {}).items():
                    self.counter_caps[(pool, cs.get("name", ""), cname)] = self._nano((v or {}).get("value"))
            for d in spec.get("devices") or []:
                if _attr(d, C.ATTR_TYPE) == C.DEVICE_TYPE_GPU:
                    uuid = str(_attr(d, C.ATTR_UUID))
                    mem = _bytes(intern, ((d.get("capacity") or {}).get(C.CAP_MEMORY) or {}).get("value"))
                    self.gpus[(pool, uuid)] = Gpu(node, pool, uuid, d.get("name", ""),
                                                  str(_attr(d, C.ATTR_PRODUCT_NAME) or ""), mem)
                pending_devices.append((d, pool, node))
        for d, pool, _node in pending_devices:
            mode = TYPE_MODE.get(str(_attr(d, C.ATTR_TYPE)))
            if mode is None:
                continue
            uuid = str(_attr(d, C.ATTR_UUID) if mode == MODE_WHOLE else _attr(d, C.ATTR_PARENT_UUID))
            mem_cap = (d.get("capacity") or {}).get(C.CAP_MEMORY) or {}
            gpu = self.gpus.get((pool, uuid))
            if gpu is None:
                if mode != MODE_MIG:
                    continue
                # static MIG (partitionable devices off): a MIG-enabled GPU is not offered whole, only its
                # existing MIG devices; the GPU is known by their parentUUID, its memory is theirs
                gpu = self.gpus[(pool, uuid)] = Gpu(_node, pool, uuid, "", str(_attr(d, C.ATTR_PRODUCT_NAME) or ""), 0)
            if not gpu.device:
                gpu.memory += _bytes(intern, mem_cap.get("value"))
            dev = Device(pool, d.get("name", ""), mode, uuid, _bytes(intern, mem_cap.get("value")),
                         bool(d.get("allowMultipleAllocations")),
                         _bytes(intern, (mem_cap.get("requestPolicy") or {}).get("default")), d,
                         any(t.get("key") != C.MANAGED_TAINT_KEY and t.get("effect") in ("NoSchedule", "NoExecute")
                             for t in d.get("taints") or []))
            gpu.devices.append(dev)
            self.devices[(pool, dev.name)] = dev
        for c in claims:
            for r in _results(c, driver):
                self._hold(r)

    def counters(self, dev: Device) -> tuple[tuple[str, str, int], ...]:
        if dev._counters is None:
            dev._counters = tuple((c.get("counterSet", ""), name, self._nano((v or {}).get("value")))
                                  for c in dev.raw.get("consumesCounters") or []
                                  for name, v in (c.get("counters") or {}).items())
        return dev._counters

    def cel_inputs(self, dev: Device) -> tuple[tuple, tuple]:
        if dev._cel is None:
            dev._cel = _cel_inputs(self.intern, dev.raw)
        return dev._cel

    def _nano(self, text: object) -> int:
        """A counter value in nano-units, as the allocator counts them (cached per text: slices repeat them)."""
        got = self._nanos.get(text)
        if got is None:
            try:
                got = self.intern.fraction(text)
            except _QUANTITIES:
                got = 0
            self._nanos[text] = got
        return got

    def _hold(self, result: Mapping) -> None:
        dev = self.devices.get((result.get("pool", ""), result.get("device", "")))
        if dev is None:
            return
        gpu = self.gpus[(dev.pool, dev.gpu_uuid)]
        first = not dev.held and dev.shares == 0
        if dev.allow_multiple:
            used = _bytes(self.intern, ((result.get("consumedCapacity") or {}).get(C.CAP_MEMORY))) or dev.share_default
            dev.shares += 1
            dev.consumed += used
            gpu.allocated += used
        else:
            if dev.held:
                return     # held twice (a double allocation): counted once
            dev.held = True
            gpu.allocated += gpu.memory if dev.mode == MODE_WHOLE else dev.memory
        if first:
            for cs, name, v in self.counters(dev):
                k = (dev.pool, cs, name)
                self.counter_used[k] = self.counter_used.get(k, 0) + v
        gpu.mode = gpu.mode or dev.mode

    def placeable(self, dev: Device, memory: int = 1) -> bool:
        """One more allocation of ``dev`` (a share of ``memory`` bytes) fits now."""
        gpu = self.gpus[(dev.pool, dev.gpu_uuid)]
        if gpu.mode not in (None, dev.mode) or dev.tainted:
            return False
        if dev.allow_multiple:
            if dev.memory - dev.consumed < max(memory, 1):
                return False
            if dev.shares:
                return True          # its counters are charged already
        elif dev.held:
            return False
        return all(self.counter_used.get((dev.pool, cs, name), 0) + v <= self.counter_caps.get((dev.pool, cs, name), v)
                   for cs, name, v in self.counters(dev))

    def usable_memory(self, dev: Device) -> int:
        """Memory one more allocation of ``dev`` could use (0 when it is not placeable)."""
        if not self.placeable(dev):
            return 0
        gpu = self.gpus[(dev.pool, dev.gpu_uuid)]
        if dev.mode == MODE_SHARED:
            return dev.memory - dev.consumed
        if dev.mode == MODE_MIG:
            return gpu.free_memory
        return gpu.memory


@dataclass
class _Request:
    """One way to satisfy a request (``exactly``, or one ``firstAvailable`` subrequest)."""
    matching: list[Device]
    count: int
    memory: int            # per device: a share's memory, else the smallest matching device's
    mode: str | None

    def __post_init__(self) -> None:
        self.ids = frozenset(id(d) for d in self.matching)


def _selectors(spec: Mapping, classes: Mapping[str, Mapping]) -> list[str] | None:
    cls = classes.get(spec.get("deviceClassName", ""))
    if cls is None:
        return None
    exprs = [(s.get("cel") or {}).get("expression", "") for s in (cls.get("spec") or {}).get("selectors") or []]
    return exprs + [(s.get("cel") or {}).get("expression", "") for s in spec.get("selectors") or []]


class _Matcher:
    def __init__(self, inv: _Inventory, classes: Mapping[str, Mapping]):
        self.inv = inv
        self.classes = classes
        self.cel = Evaluator()
        self._memo: dict[tuple, _Request] = {}
        self._matching: dict[tuple[str, ...], list[Device]] = {}
        self.verdicts: dict[int, str | None] = {}            # id(request) -> _verdict

    def _matches(self, compiled: list, dev: Device) -> bool:
        try:
            attrs, caps = self.inv.cel_inputs(dev)
            return all(self.cel.evaluate(s, self.inv.driver, attrs, caps, dev.allow_multiple) for s in compiled)
        except CelError:
            return False          # a runtime error: the device does not match (upstream fails the claim)

    def _signature(self, needs: list[tuple[str, str, str]], dev: Device) -> tuple:
        """The published values of what the selectors read: devices alike in these match alike (most devices
        of a cluster differ only in names and UUIDs, which shipped selectors never read)."""
        raw, driver = dev.raw, self.inv.driver
        out: list[object] = [dev.allow_multiple]
        for which, domain, name in needs:
            src = raw.get(which) or {}
            v = src.get(name) if domain == driver else None
            if v is None:
                v = src.get(f"{domain}/{name}")
            out.append(repr(v))      # a different key order only costs one more evaluation
        return tuple(out)

    def matching(self, exprs: list[str]) -> list[Device]:
        k = tuple(exprs)
        got = self._matching.get(k)
        if got is not None:
            return got
        try:
            compiled = [self.cel.compile(e) for e in exprs]
        except CelError:
            got = self._matching[k] = []
            return got
        needs = None if any(s.needs is None or any(not n for _, _, n in s.needs) for s in compiled) else \
            sorted({n for s in compiled for n in s.needs})
        if needs is None:
            got = [dev for dev in self.inv.devices.values() if self._matches(compiled, dev)]
        else:
            seen: dict[tuple, bool] = {}
            got = []
            for dev in self.inv.devices.values():
                sig = self._signature(needs, dev)
                hit = seen.get(sig)
                if hit is None:
                    hit = seen[sig] = self._matches(compiled, dev)
                if hit:
                    got.append(dev)
        self._matching[k] = got
        return got

    def request(self, spec: Mapping) -> _Request:
        exprs = _selectors(spec, self.classes)
        mem_req = _bytes(self.inv.intern, ((spec.get("capacity") or {}).get("requests") or {}).get(C.CAP_MEMORY))
        count = int(spec.get("count") or 1) if spec.get("allocationMode", "ExactCount") == "ExactCount" else 1
        memo_key = (tuple(exprs) if exprs is not None else None, mem_req, count)
        got = self._memo.get(memo_key)
        if got is not None:
            return got
        matching = self.matching(exprs) if exprs is not None else []
        modes = {d.mode for d in matching}
        mode = next(iter(modes)) if len(modes) == 1 else None
        if mode == MODE_SHARED:
            memory = mem_req or min((d.share_default for d in matching), default=0)
        else:
            memory = min((d.memory for d in matching), default=0)
        got = self._memo[memo_key] = _Request(matching, count, memory, mode)
        return got

    def hosts(self, gpu: Gpu, req: _Request) -> int:
        """How many devices of ``req`` this GPU can take now."""
        n = 0
        for d in gpu.devices:
            if id(d) not in req.ids:
                continue
            if d.allow_multiple:
                if self.inv.placeable(d, req.memory):
                    n += (d.memory - d.consumed) // max(req.memory, 1)
            elif self.inv.placeable(d):
                n += 1
        return n


def _verdict(matcher: _Matcher, req: _Request, by_node: Mapping[str, list[Gpu]]) -> str | None:
    """None when some node can take the request now, else why not."""
    if id(req) not in matcher.verdicts:
        matcher.verdicts[id(req)] = _decide(matcher, req, by_node)
    return matcher.verdicts[id(req)]


def _decide(matcher: _Matcher, req: _Request, by_node: Mapping[str, list[Gpu]]) -> str | None:
    if not req.matching:
        return REASON_NO_MATCH
    fragmented = False
    matched = {(d.pool, d.gpu_uuid) for d in req.matching if not d.tainted}    # a tainted GPU's memory is no use
    for gpus in by_node.values():
        mine = [g for g in gpus if (g.pool, g.uuid) in matched]
        if sum(matcher.hosts(g, req) for g in mine) >= req.count:
            return None
        if sum(g.free_memory for g in mine) >= req.count * max(req.memory, 1):
            fragmented = True
    return REASON_FRAGMENTED if fragmented else REASON_INSUFFICIENT


def _alternatives(request: Mapping) -> list[Mapping]:
    if "exactly" in request:
        return [request.get("exactly") or {}]
    return list(request.get("firstAvailable") or [])


# -- the computation --------------------------------------------------------------------------------
def compute(slices: Iterable[Mapping], claims: Iterable[Mapping], pods: Iterable[Mapping],
            classes: Mapping[str, Mapping], driver: str = C.DEFAULT_DRIVER_NAME) -> Capacity:
    """Capacity of ``driver``'s published GPUs, from API objects only (``classes``: DeviceClass name -> object)."""
    claims = list(claims)
    inv = _Inventory(slices, claims, driver)
    by_node: dict[str, list[Gpu]] = {}
    for g in sorted(inv.gpus.values(), key=lambda g: (g.node, g.device)):
        by_node.setdefault(g.node, []).append(g)
    matcher = _Matcher(inv, classes)

    # pending claims, and the smallest pending request of each mode
    partita = {n for n, c in classes.items() if is_partita_class(c, driver)}
    by_key = {key(c): c for c in claims}
    waiting: dict[str, list[str]] = {}
    for p in pods:
        if not is_pending(p):
            continue
        ns = (p.get("metadata") or {}).get("namespace", "")
        for pc in pod_claims(p):
            c = by_key.get(f"{ns}/{pc.claim_name}") if pc.claim_name else None
            if c is None or (c.get("status") or {}).get("allocation") or not ownership(c, partita).ours:
                continue
            waiting.setdefault(key(c), []).append(key(p))
    pending: list[PendingClaim] = []
    smallest: dict[str, _Request] = {}
    for ck, pod_keys in sorted(waiting.items()):
        c = by_key[ck]
        ns, name = ck.split("/", 1)
        spec = c.get("spec") or {}
        if validate_claim_configs(spec, driver, f"claim {ck} spec.devices"):
            pending.append(PendingClaim(ns, name, sorted(pod_keys), REASON_INVALID_CONFIG, None, 0))
            continue
        worst: tuple[int, str, _Request | None] = (len(REASONS) - 1, REASON_UNSCHEDULABLE, None)
        for r in (spec.get("devices") or {}).get("requests") or []:
            best: tuple[int, str, _Request | None] = (REASONS.index(REASON_NO_MATCH), REASON_NO_MATCH, None)
            for req in (matcher.request(a) for a in _alternatives(r)):
                why = _verdict(matcher, req, by_node) or REASON_UNSCHEDULABLE
                if req.mode is not None and req.matching and (req.mode not in smallest
                                                              or req.memory < smallest[req.mode].memory):
                    smallest[req.mode] = req
                if REASONS.index(why) > best[0]:
                    best = (REASONS.index(why), why, req)
            if best[0] < worst[0]:
                worst = best
        req = worst[2]
        pending.append(PendingClaim(ns, name, sorted(pod_keys), worst[1], req.mode if req else None,
                                    req.memory if req else 0))

    nodes: dict[str, dict[str, ModeCapacity]] = {}
    for node, gpus in by_node.items():
        per = nodes[node] = {m: ModeCapacity() for m in MODES}
        for g in gpus:
            for m in g.modes():
                mc = per[m]
                mc.gpus_total += 1
                mc.memory_total += g.memory
                # every placeable device of a mode could use the same memory (the GPU's, its unallocated
                # memory, or the one shared device's): the first placeable one tells
                usable = next((u for d in g.devices if d.mode == m for u in [inv.usable_memory(d)] if u > 0), 0)
                if usable > 0:
                    mc.gpus_free += 1
                    mc.memory_free += usable
                req = smallest.get(m)
                if req is not None and g.free_memory > 0 and matcher.hosts(g, req) == 0 and \
                        any(id(d) in req.ids and not d.tainted for d in g.devices):
                    mc.fragmented_gpus += 1
                    mc.fragmented_memory += g.free_memory
            if g.mode is not None:
                per[g.mode].gpus_allocated += 1
                per[g.mode].memory_allocated += g.allocated

    pods_out: dict[str, PendingPod] = {}
    for pc in pending:
        for pk in pc.pods:
            ns, name = pk.split("/", 1)
            pp = pods_out.setdefault(pk, PendingPod(ns, name, pc.reason, []))
            pp.claims.append(f"{pc.namespace}/{pc.name}")
            if REASONS.index(pc.reason) < REASONS.index(pp.reason):
                pp.reason = pc.reason
    return Capacity(nodes, [g for gs in by_node.values() for g in gs], pending,
                    [pods_out[k] for k in sorted(pods_out)])


# -- gauges ------------------------------------------------------------------------------------------
class CapacityGauges:
    """Sets the capacity gauges (declared in metrics.py) from :func:`compute`, at most every
    ``min_interval`` seconds, and removes the series of nodes that are gone."""

    def __init__(self, driver: str, min_interval: float = DEFAULT_REFRESH_SECONDS):
        self.driver = driver
        self.min_interval = min_interval
        self._last = float("-inf")
        self._nodes: set[str] = set()
        self._running = False            # a background computation is under way

    def publish(self, cap: Capacity) -> None:
        from . import metrics

        for node in self._nodes - set(cap.nodes):
            for m in MODES:
                for st in STATES:
                    _remove(metrics.CAPACITY_GPUS, node, m, st)
                    _remove(metrics.CAPACITY_MEMORY, node, m, st)
                _remove(metrics.FRAGMENTED_GPUS, node, m)
                _remove(metrics.FRAGMENTED_MEMORY, node, m)
        for node, per in cap.nodes.items():
            for m, mc in per.items():
                for st in STATES:
                    metrics.CAPACITY_GPUS.labels(node, m, st).set(mc.gpus(st))
                    metrics.CAPACITY_MEMORY.labels(node, m, st).set(mc.memory(st))
                metrics.FRAGMENTED_GPUS.labels(node, m).set(mc.fragmented_gpus)
                metrics.FRAGMENTED_MEMORY.labels(node, m).set(mc.fragmented_memory)
        for reason, n in cap.pending_by_reason().items():
            metrics.PENDING_BY_REASON.labels(reason).set(n)
        self._nodes = set(cap.nodes)

    def refresh(self, slices: Iterable[Mapping], claims: Iterable[Mapping], pods: Iterable[Mapping],
                classes: Mapping[str, Mapping], now: float | None = None) -> Capacity | None:
        """Recompute and publish unless the last refresh was under ``min_interval`` ago (None then)."""
        now = time.monotonic() if now is None else now
        if now - self._last < self.min_interval:
            return None
        self._last = now
        cap = compute(slices, claims, pods, classes, self.driver)
        self.publish(cap)
        return cap

    def refresh_controller(self, controller) -> bool:  # noqa: ANN001 - controller.Controller
        """The controller's hook, called from its ticker: when due and no computation is running, take the
        informers' objects (every slice of our driver, in either allocation mode) and the cache's claims, pods
        and classes, and compute and publish in a background thread, so the worker is never held up by it.
        True when a computation was started. Never raises; a failure is logged and the gauges keep their values."""
        informers = getattr(controller, "informers", None)
        now = time.monotonic()
        if informers is None or self._running or now - self._last < self.min_interval:
            return False
        try:
            cache = controller.cache
            snapshot = (list(informers.by_kind("slice").known.values()), list(cache.claims.values()),
                        list(cache.pods.values()), dict(cache.classes))
        except Exception:  # noqa: BLE001 - metrics must never stop the controller
            log.exception("reading the cache for the capacity gauges failed")
            return False
        self._last = now
        self._running = True
        threading.Thread(target=self._background, args=snapshot, name="partita-capacity", daemon=True).start()
        return True

    def _background(self, slices: list, claims: list, pods: list, classes: dict) -> None:
        try:
            self.publish(compute(slices, claims, pods, classes, self.driver))
        except Exception:  # noqa: BLE001 - metrics must never stop the controller
            log.exception("computing the capacity gauges failed")
        finally:
            self._running = False


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


__all__ = ["MODES", "REASONS", "STATES", "Capacity", "CapacityGauges", "Gpu", "ModeCapacity", "PendingClaim",
           "PendingPod", "compute"]
