"""One allocation attempt for one node: upstream's incubating ``Allocate`` (depth-first search, first
solution wins, combinations within a request, backtracking across requests and claims).

Kept close to structured/internal/incubating/allocator_incubating.go so results match kube-scheduler's
in the ``first-fit`` order; a strategy may only reorder candidate devices.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from driver.api import objects
from driver.api.quantity import Quantity, QuantityError

from . import capacity as cap
from .cel import CelCompileError, CelError, CelRuntimeError, Evaluator, runtime_error_hint
from .constraints import Constraint, DistinctAttribute, MatchAttribute
from .nodeselector import node_matches
from .pools import CDevice, Pool, available_counters, thaw
from .types import AllocatedState, AllocationError, DeviceID, Features, Node

MAX_RESULTS = 32
#: the reasons of :meth:`Run.exclusion` that mean the device is not selected for the request at all
SELECTION = ("node", "class selector", "request selector")


class _MaxSizeExceeded(Exception):
    pass


class SearchLimitExceeded(AllocationError):
    """The search took more than ``Run.max_steps`` steps on a node (only when a limit is set; upstream has
    none, kube-scheduler bounds the whole filter by time instead). Node-local: other nodes may be tried."""


def claim_ref(claim: Mapping) -> str:
    md = claim.get("metadata") or {}
    return f"{md['namespace']}/{md.get('name', '')}" if md.get("namespace") else md.get("name", "")


@dataclass(eq=False)
class ReqData:
    claim_index: int
    request_index: int
    sub_index: int
    name: str
    parent: str | None                 # parent request name for a firstAvailable subrequest
    spec: Mapping
    cls: Mapping | None
    mode: str
    num_devices: int = 0
    all_devices: list[tuple[Pool, CDevice]] = field(default_factory=list)
    selected_sub: int = 0
    capacity_requests: dict[str, Quantity] | None = None

    @property
    def full_name(self) -> str:
        return f"{self.parent}/{self.name}" if self.parent else self.name

    @property
    def admin(self) -> bool:
        return bool(self.spec.get("adminAccess")) and self.parent is None

    @property
    def tolerations(self) -> list[dict]:
        return list(self.spec.get("tolerations") or [])


@dataclass
class _Result:
    req: ReqData
    dev: CDevice
    share_id: str | None
    consumed: dict[str, Quantity] | None


def tolerates(toleration: Mapping, taint: Mapping) -> bool:
    if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
        return False
    if toleration.get("key") and toleration.get("key") != taint.get("key"):
        return False
    op = toleration.get("operator") or "Equal"
    if op == "Equal":
        return (toleration.get("value") or "") == (taint.get("value") or "")
    return op == "Exists"


def taint_prevents(dev: CDevice, tolerations: Sequence[Mapping]) -> bool:
    for t in dev.taints:
        if t.get("effect") in ("NoSchedule", "NoExecute") and not any(tolerates(x, t) for x in tolerations):
            return True
    return False


class Run:
    """State of one Allocate call."""

    def __init__(self, *, features: Features, node: Node, claims: Sequence[Mapping], pools: list[Pool],
                 classes: Mapping[str, Mapping], allocated: AllocatedState, evaluator: Evaluator,
                 order: Callable[[ReqData, list[tuple[Pool, CDevice]]], list[tuple[Pool, CDevice]]] | None = None):
        self.f = features
        self.node = node
        self.claims = claims
        self.pools = pools
        self.classes = classes
        self.allocated = allocated
        self.ev = evaluator
        self.order = order
        #: per claim, its spec.devices.requests (indexed as ``request_index``)
        self.requests: list[list[Mapping]] = [objects.device_requests(c) for c in claims]
        self.req: dict[tuple[int, int, int], ReqData] = {}
        self.constraints: list[list[Constraint]] = []
        self.results: list[list[_Result]] = [[] for _ in claims]
        self.allocating: dict[DeviceID, set[int]] = {}
        self.allocating_capacity: dict[DeviceID, dict[str, Quantity]] = {}
        self.consumed_counters: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        self.available_counters: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
        self.match_cache: dict[tuple[CDevice, tuple[int, int, int]], bool] = {}
        self.candidates: dict[tuple[int, int, int], list[tuple[Pool, CDevice, tuple | None]]] = {}
        self.steps = 0
        self.max_steps = 0               # 0: no limit (upstream); see SearchLimitExceeded
        self.invalid_pools = [p for p in pools if p.invalid]

    # -- validation (upstream Allocate prologue) -------------------------------------------------
    def prepare(self) -> None:
        for ci, claim in enumerate(self.claims):
            cref = claim_ref(claim)
            bad = objects.malformed_requests(claim)
            if bad:
                raise AllocationError(f"claim {cref}: {bad[0]} is not an object; a request needs a name and either "
                                      "exactly or firstAvailable", claim=cref, field=bad[0])
            requests = self.requests[ci]
            min_devices = 0
            for ri, request in enumerate(requests):
                name = request.get("name", "")
                subs = request.get("firstAvailable") or []
                if subs and not self.f.prioritized_list:
                    raise AllocationError(f"claim {cref}, request {name}: has subrequests, but the DRAPrioritizedList "
                                          "feature is disabled", claim=cref, request=name, field="firstAvailable")
                if not self.f.consumable_capacity:
                    exactly = request.get("exactly") or {}
                    if exactly.get("capacity") is not None:
                        raise AllocationError(f"claim {cref}, request {name}: has capacity requests, but the "
                                              "DRAConsumableCapacity feature is disabled", claim=cref, request=name,
                                              field="exactly.capacity")
                    for sub in subs:
                        if sub.get("capacity") is not None:
                            raise AllocationError(f"claim {cref}, subrequest {sub.get('name')}: has capacity requests, "
                                                  "but the DRAConsumableCapacity feature is disabled", claim=cref,
                                                  request=name, field="firstAvailable.capacity")
                if subs:
                    lowest = None
                    for si, sub in enumerate(subs):
                        rd = self._validate(ci, ri, si, sub, name, cref)
                        lowest = rd.num_devices if lowest is None else min(lowest, rd.num_devices)
                    min_devices += lowest or 0
                else:
                    if "exactly" not in request:
                        raise AllocationError(f"claim {cref}, request {name}: missing device class name (unsupported "
                                              "request type?)", claim=cref, request=name, field="exactly")
                    min_devices += self._validate(ci, ri, 0, request["exactly"], None, cref, name).num_devices
            if min_devices > MAX_RESULTS:
                raise AllocationError(f"claim {cref}: number of requested devices {min_devices} exceeds the claim limit "
                                      f"of {MAX_RESULTS}", claim=cref, field="spec.devices.requests")
            cons: list[Constraint] = []
            for i, c in enumerate(((claim.get("spec") or {}).get("devices") or {}).get("constraints") or []):
                if c.get("matchAttribute"):
                    cons.append(MatchAttribute(set(c.get("requests") or []), c["matchAttribute"]))
                elif c.get("distinctAttribute"):
                    cons.append(DistinctAttribute(set(c.get("requests") or []), c["distinctAttribute"]))
                else:
                    raise AllocationError(f"claim {cref}, constraint #{i}: empty constraint (unsupported constraint "
                                          "type?)", claim=cref, field=f"spec.devices.constraints[{i}]")
            self.constraints.append(cons)

    def _validate(self, ci: int, ri: int, si: int, spec: Mapping, parent: str | None, cref: str,
                  name: str | None = None) -> ReqData:
        rname = name if parent is None else spec.get("name", "")
        where = f"claim {cref}, request {rname if parent is None else parent + '/' + rname}"
        for i, sel in enumerate(spec.get("selectors") or []):
            if not (sel.get("cel") or {}).get("expression"):
                raise AllocationError(f"claim {cref}, request {rname}, selector #{i}: CEL expression empty "
                                      "(unsupported selector type?)", claim=cref, request=rname, field=f"selectors[{i}]")
        if parent is None and spec.get("adminAccess") is not None and not self.f.admin_access:
            raise AllocationError(f"claim {cref}, request {rname}: admin access is requested, but the feature is "
                                  "disabled", claim=cref, request=rname, field="adminAccess")
        class_name = spec.get("deviceClassName") or ""
        if not class_name:
            raise AllocationError(f"claim {cref}, request {rname}: missing device class name (unsupported request "
                                  "type?)", claim=cref, request=rname, field="deviceClassName")
        cls = self.classes.get(class_name)
        if cls is None:
            raise AllocationError(f"claim {cref}, request {rname}: could not retrieve device class {class_name}: "
                                  f'deviceclass.resource.k8s.io "{class_name}" not found; create the DeviceClass or '
                                  "use an existing one", claim=cref, request=rname, field="deviceClassName")
        mode = spec.get("allocationMode") or "ExactCount"
        rd = ReqData(ci, ri, si, rname, parent, spec, cls, mode)
        caps = (spec.get("capacity") or {}).get("requests")
        if caps is not None:
            try:
                rd.capacity_requests = {k: Quantity.parse(v) for k, v in caps.items()}
            except QuantityError as e:
                raise AllocationError(f"{where}: capacity.requests: {e}", claim=cref, request=rname,
                                      field="capacity.requests") from None
        key = (ci, ri, si)
        self.req[key] = rd
        if mode == "ExactCount":
            count = spec.get("count", 1)
            if count is None:
                count = 1
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise AllocationError(f"{where}: count {count!r} is invalid: it must be a positive integer",
                                      claim=cref, request=rname, field="count")
            if count > 2**31:
                raise AllocationError(f"{where}: exact count {count} is too large", claim=cref, request=rname,
                                      field="count")
            rd.num_devices = count
        elif mode == "All":
            for pool in self.pools:
                if pool.incomplete:
                    raise AllocationError(f"{where}: asks for all devices, but resource pool {pool} is currently being "
                                          "updated", claim=cref, request=rname, field="allocationMode")
                if pool.invalid:
                    raise AllocationError(f"{where}: asks for all devices, but resource pool {pool} is currently "
                                          "invalid", claim=cref, request=rname, field="allocationMode")
                for dev, failure in self.class_list(pool, rd):
                    if failure is not None and not self.binding_excluded(dev):
                        self._raise_selector_error(rd, dev, failure, from_class=True)
                    if not self.request_ok(key, rd, dev):
                        continue
                    if self.f.consumable_capacity and not self._capacity_fits(rd, dev):
                        continue
                    rd.all_devices.append((pool, dev))
            rd.num_devices = len(rd.all_devices)
        else:
            raise AllocationError(f"{where}: unsupported count mode {mode}", claim=cref, request=rname,
                                  field="allocationMode")
        return rd

    # -- selectors -------------------------------------------------------------------------------
    def class_list(self, pool: Pool, rd: ReqData) -> list[tuple[CDevice, tuple | None]]:
        """Devices of ``pool`` (targeting the node, in order) that pass the class selectors — or whose
        selector failed: ``(device, (selector index, expression, error))`` — cached in the pool across
        calls, because a class selector's result depends on the device alone."""
        selectors = tuple(((sel.get("cel") or {}).get("expression", "") for sel in
                           ((rd.cls or {}).get("spec") or {}).get("selectors") or []))
        cache = pool.class_cache
        got = cache.get(selectors)
        if got is None:
            got = []
            compiled = []
            for i, expr in enumerate(selectors):
                try:
                    compiled.append((i, expr, self.ev.compile(expr), None))
                except CelCompileError as e:
                    compiled.append((i, expr, None, e))
            evaluate = self.ev.evaluate
            for dev in pool.devices():
                outcome: bool | tuple = True
                for i, expr, program, error in compiled:
                    if error is not None:
                        outcome = (i, expr, error)
                        break
                    try:
                        if not evaluate(program, dev.id.driver, dev.attrs, dev.capacity, dev.allow_multiple):
                            outcome = False
                            break
                    except CelRuntimeError as e:
                        outcome = (i, expr, e)
                        break
                if outcome is not False:
                    got.append((dev, None if outcome is True else outcome))
            cache[selectors] = got
        return got

    def _evaluate(self, dev: CDevice, selectors: Sequence[str]) -> bool | tuple:
        """True, False, or (index, expression, CelError) for the first selector that failed."""
        for i, expr in enumerate(selectors):
            if dev.matches is None:
                dev.matches = {}
            cached = dev.matches.get(expr)
            if cached is None:
                try:
                    compiled = self.ev.compile(expr)
                except CelCompileError as e:
                    return (i, expr, e)
                try:
                    cached = self.ev.evaluate(compiled, dev.id.driver, dev.attrs, dev.capacity, dev.allow_multiple)
                except CelRuntimeError as e:
                    cached = e
                dev.matches[expr] = cached
            if isinstance(cached, CelError):
                return (i, expr, cached)
            if not cached:
                return False
        return True

    def _raise_selector_error(self, rd: ReqData, dev: CDevice, failure: tuple, from_class: bool) -> None:
        i, expr, err = failure
        cref = claim_ref(self.claims[rd.claim_index])
        where = (f"claim {cref}, request {rd.full_name}: class {rd.cls['metadata']['name']}" if from_class and rd.cls
                 else f"claim {cref}, request {rd.full_name}: claim {cref}")
        if isinstance(err, CelCompileError):
            raise AllocationError(f"{where}: selector #{i}: CEL compile error: {err} (expression: {expr})",
                                  claim=cref, request=rd.full_name, field=f"selectors[{i}].cel.expression")
        msg = str(err) + runtime_error_hint(str(err), expr, dev.id.driver, dev.attrs, dev.capacity)
        raise AllocationError(f"{where}: selector #{i} on device {dev.id}: CEL runtime error: {msg} "
                              f"(expression: {expr})", claim=cref, request=rd.full_name,
                              field=f"selectors[{i}].cel.expression")

    def binding_excluded(self, dev: CDevice) -> bool:
        """A device with binding conditions while the feature is off: upstream's isSelectable rejects it
        before evaluating any selector, so its class selectors cannot fail on it."""
        return not self.f.device_binding_and_status and dev.has_binding_conditions

    def request_ok(self, key: tuple[int, int, int], rd: ReqData, dev: CDevice) -> bool:
        """The (sub)request's own selectors, binding conditions and per-device node selection; the
        class selectors were applied by :meth:`class_list`."""
        mk = (dev, key)
        hit = self.match_cache.get(mk)
        if hit is not None:
            return hit
        ok = not self.binding_excluded(dev)
        selectors = rd.spec.get("selectors")
        if ok and selectors:
            outcome = self._evaluate(dev, [(sel.get("cel") or {}).get("expression", "") for sel in selectors])
            if isinstance(outcome, tuple):
                self._raise_selector_error(rd, dev, outcome, from_class=False)
            ok = bool(outcome)
        if ok and dev.slice.per_device:
            ok = _device_node_fits(self.node, dev)
        self.match_cache[mk] = ok
        return ok

    def exclusion(self, key: tuple[int, int, int], rd: ReqData, pool: Pool, dev: CDevice,
                  failure: bool | tuple | None) -> str | None:
        """The first check that rules ``dev`` out for the (sub)request on its own, or None when it may be
        tried (what is left — counters taken together with the run's other devices, constraints across
        devices — is the search's). ``failure`` is the device's class-selector outcome from
        :meth:`class_list`: None (passes), False (not listed: the class's selectors reject it) or the
        selector error, raised here as the search raises it (not for a device with binding conditions
        while the feature is off: upstream never evaluates selectors on it).

        The reasons, in the order they are checked (``partita explain`` counts devices under them): ``node``
        (per-device node selection names another node), ``class selector``, ``request selector``, ``taint``
        (an untolerated NoSchedule/NoExecute taint), ``allocated`` (a dedicated device other claims hold),
        ``counters`` (shared counters used up by other claims' devices), ``capacity``. Devices this run is
        allocating are the search's to skip (it checks that first, as upstream does)."""
        if failure is False:
            return "node" if self._off_node(dev) else "class selector"
        if failure is not None and not self.binding_excluded(dev):
            self._raise_selector_error(rd, dev, failure, from_class=True)
        if not self.request_ok(key, rd, dev):
            return "node" if self._off_node(dev) else "request selector"
        if self.f.device_taints and dev.taints and taint_prevents(dev, rd.tolerations):
            return "taint"
        if not rd.admin and dev.id in self.allocated.devices:
            return "allocated"
        if dev.consumes:
            if not self.f.partitionable_devices:
                return "counters"
            if not (self.f.consumable_capacity and dev.allow_multiple and dev.id in self.allocated.capacity):
                avail = self._available(pool)
                for cs, counters in dev.consumes:
                    have = avail.get(cs, {})
                    for c, v in counters:
                        if have.get(c, 0) < v:
                            return "counters"
        if self.f.consumable_capacity and not self._capacity_fits(rd, dev):
            return "capacity"
        return None

    def _off_node(self, dev: CDevice) -> bool:
        return dev.slice.per_device and not _device_node_fits(self.node, dev)

    # -- state queries ---------------------------------------------------------------------------
    def _in_use(self, did: DeviceID) -> bool:
        return did in self.allocated.devices or bool(self.allocating.get(did))

    def _capacity_in_use(self, did: DeviceID) -> bool:
        return did in self.allocated.capacity or did in self.allocating_capacity


    def _capacity_fits(self, rd: ReqData, dev: CDevice) -> bool:
        try:
            return cap.fits(self.allocated.capacity.get(dev.id, {}), rd.capacity_requests, dev.capacity,
                            self.allocating_capacity.get(dev.id, {}))
        except cap.UnknownCapacity:
            return False

    def _available(self, pool: Pool) -> dict[str, dict[str, int]]:
        got = self.available_counters.get(pool.id)
        if got is None:
            got = self.available_counters[pool.id] = available_counters(pool, self.allocated)
        return got

    def _take_counters(self, pool: Pool, dev: CDevice) -> bool:
        avail = self._available(pool)
        used = self.consumed_counters.setdefault(pool.id, {})
        for cs, counters in dev.consumes:
            u = used.setdefault(cs, {})
            for c, v in counters:
                u[c] = u.get(c, 0) + v
        for cs, counters in avail.items():
            u = used.get(cs, {})
            for c, v in counters.items():
                if v < u.get(c, 0):
                    self._return_counters(pool, dev)
                    return False
        return True

    def _return_counters(self, pool: Pool, dev: CDevice) -> None:
        used = self.consumed_counters.get(pool.id, {})
        for cs, counters in dev.consumes:
            u = used.get(cs, {})
            for c, v in counters:
                u[c] = u.get(c, 0) - v

    # -- search ----------------------------------------------------------------------------------
    def _candidates(self, key: tuple[int, int, int], rd: ReqData) -> list[tuple[Pool, CDevice, tuple | None]]:
        got = self.candidates.get(key)
        if got is None:
            got = [(p, d, failure) for p in self.pools if not (p.incomplete or p.invalid)
                   for d, failure in self.class_list(p, rd)]
            if self.order is not None:
                order = self.order(rd, [(p, d) for p, d, _ in got])
                failures = {id(d): f for _, d, f in got}
                got = [(p, d, failures[id(d)]) for p, d in order]
            self.candidates[key] = got
        return got

    def search(self) -> bool:
        try:
            return self._one(0, 0, 0, 0, False, 0)
        except _MaxSizeExceeded:
            return False

    def _one(self, ci: int, ri: int, si: int, di: int, in_sub: bool, start: int) -> bool:
        self.steps += 1
        if self.max_steps and self.steps > self.max_steps:
            raise SearchLimitExceeded(f"allocation search on node {self.node.name} gave up after {self.max_steps} "
                                      "steps", node_local=True)
        if ci >= len(self.claims):
            return True
        if ri >= len(self.requests[ci]):
            try:
                return self._one(ci + 1, 0, 0, 0, False, 0)
            except _MaxSizeExceeded:
                return False
        key = (ci, ri, si)
        rd = self.req[key]
        if not in_sub and rd.parent is not None:
            all_exceeded = True
            sub = 0
            while (ci, ri, sub) in self.req:
                try:
                    ok = self._one(ci, ri, sub, 0, True, 0)
                except _MaxSizeExceeded:
                    sub += 1
                    continue
                all_exceeded = False
                if ok:
                    self.req[(ci, ri, 0)].selected_sub = sub
                    return True
                sub += 1
            if all_exceeded:
                raise _MaxSizeExceeded()
            return False
        if rd.mode == "All" and not rd.all_devices:
            return False
        if di >= rd.num_devices:
            return self._one(ci, ri + 1, 0, 0, False, 0)
        if len(self.results[ci]) + rd.num_devices - di > MAX_RESULTS:
            raise _MaxSizeExceeded()
        if rd.mode == "All":
            pool, dev = rd.all_devices[di]
            ok, undo = self._allocate_device(ci, rd, pool, dev, must=True)
            if not ok:
                return False
            try:
                done = self._one(ci, ri, si, di + 1, in_sub, 0)
            except BaseException:
                undo()
                raise
            if not done:
                undo()
            return done
        cands = self._candidates(key, rd)
        for idx in range(start, len(cands)):
            pool, dev, failure = cands[idx]
            if rd.admin:
                if ci in self.allocating.get(dev.id, ()):
                    continue
            elif self._in_use(dev.id):
                continue
            if self.exclusion(key, rd, pool, dev, failure) is not None:
                continue
            ok, undo = self._allocate_device(ci, rd, pool, dev, must=False)
            if not ok:
                continue
            try:
                done = self._one(ci, ri, si, di + 1, in_sub, idx + 1)
            except BaseException:
                undo()
                raise
            if done:
                return True
            undo()
        return False

    def _allocate_device(self, ci: int, rd: ReqData, pool: Pool, dev: CDevice,
                         must: bool) -> tuple[bool, Callable[[], None]]:
        nothing = (False, lambda: None)
        multi = self.f.consumable_capacity and dev.allow_multiple
        if not multi and rd.admin and ci in self.allocating.get(dev.id, ()):
            return nothing
        if not rd.admin and self._in_use(dev.id):
            return nothing
        if not self.f.partitionable_devices and dev.consumes:
            return nothing
        # Upstream's order (allocator_incubating.go allocateDevice): in use, counters, taints, constraints,
        # capacity. The order is observable: for an ``All`` request (must=True) a device without counters
        # left makes the node unsatisfiable before its constraint could raise the fatal error. Unlike
        # upstream (see shared/oracle/README.md, the counter leak), counters taken here are given back
        # whenever a later check rejects the device.
        took_counters = False
        if dev.consumes and not (multi and self._capacity_in_use(dev.id)):
            if not self._take_counters(pool, dev):
                return nothing
            took_counters = True
        if self.f.device_taints and taint_prevents(dev, rd.tolerations):
            if took_counters:
                self._return_counters(pool, dev)
            return nothing
        base = rd.parent or rd.name
        sub = rd.name if rd.parent else ""
        cons = self.constraints[ci]
        for i, c in enumerate(cons):
            if not c.add(base, sub, dev):
                for e in range(i):
                    cons[e].remove(base, sub, dev)
                if took_counters:
                    self._return_counters(pool, dev)
                if must:
                    cref = claim_ref(self.claims[ci])
                    raise AllocationError(f"claim {cref}, request {rd.name}: cannot add device {dev.id} because a claim "
                                          "constraint would not be satisfied", claim=cref, request=rd.name,
                                          field=f"spec.devices.constraints[{i}]")
                return nothing
        consumed: dict[str, Quantity] | None = None
        share_id = None
        if self.f.consumable_capacity:
            if not self._capacity_fits(rd, dev):
                for c in cons:
                    c.remove(base, sub, dev)
                if took_counters:
                    self._return_counters(pool, dev)
                return nothing
            if multi:
                consumed = cap.consumption(rd.capacity_requests, dev.capacity)
                share_id = str(uuid.uuid4())
                acc = self.allocating_capacity.setdefault(dev.id, {})
                for k, v in consumed.items():
                    acc[k] = acc.get(k, Quantity.from_int(0)) + v
        if not multi:
            self.allocating.setdefault(dev.id, set()).add(ci)
        self.results[ci].append(_Result(rd, dev, share_id, consumed or None))
        n = len(self.results[ci]) - 1

        def undo() -> None:
            for c in cons:
                c.remove(base, sub, dev)
            if not multi:
                self.allocating.get(dev.id, set()).discard(ci)
            if consumed:
                acc = self.allocating_capacity.get(dev.id, {})
                for k, v in consumed.items():
                    acc[k] = acc[k] - v
                if all(q.sign() == 0 for q in acc.values()):
                    self.allocating_capacity.pop(dev.id, None)
            if took_counters:
                self._return_counters(pool, dev)
            del self.results[ci][n:]
        return True, undo

    # -- result ----------------------------------------------------------------------------------
    def build(self) -> list[dict]:
        out = []
        for ci, claim in enumerate(self.claims):
            results = []
            for r in self.results[ci]:
                entry: dict[str, Any] = {"request": r.req.full_name, "driver": r.dev.id.driver,
                                         "pool": r.dev.id.pool, "device": r.dev.id.device}
                if r.req.admin:
                    entry["adminAccess"] = True
                if r.req.tolerations:
                    entry["tolerations"] = [dict(t) for t in r.req.tolerations]
                if self.f.device_binding_and_status and r.dev.binding:
                    for f, values in zip(("bindingConditions", "bindingFailureConditions"), r.dev.binding):
                        if values:
                            entry[f] = list(values)
                if r.share_id:
                    entry["shareID"] = r.share_id
                if r.consumed:
                    entry["consumedCapacity"] = {k: v.canonical() for k, v in r.consumed.items()}
                results.append(entry)
            alloc: dict[str, Any] = {"devices": {"results": results}}
            config = self._config(ci, claim)
            if config:
                alloc["devices"]["config"] = config
            selector = self._node_selector(self.results[ci])
            if selector is not None:
                alloc["nodeSelector"] = selector
            out.append(alloc)
        return out

    def _selected(self, ci: int, ri: int) -> ReqData:
        rd = self.req[(ci, ri, 0)]
        if rd.parent is not None:
            return self.req[(ci, ri, self.req[(ci, ri, 0)].selected_sub)]
        return rd

    def _config(self, ci: int, claim: Mapping) -> list[dict]:
        requests = self.requests[ci]
        config: list[dict] = []
        by_class: dict[str, tuple[int, int]] = {}
        for ri in range(len(requests)):
            rd = self._selected(ci, ri)
            cls = rd.cls
            if cls is None:
                continue
            cname = cls["metadata"]["name"]
            if cname in by_class:
                a, b = by_class[cname]
                for i in range(a, b):
                    config[i]["requests"].append(rd.full_name)
                continue
            start = len(config)
            for c in (cls.get("spec") or {}).get("config") or []:
                config.append({"source": "FromClass", "requests": [rd.full_name],
                               **{k: v for k, v in c.items() if k != "requests"}})
            by_class[cname] = (start, len(config))
        for c in ((claim.get("spec") or {}).get("devices") or {}).get("config") or []:
            reqs = c.get("requests") or []
            entry = {"source": "FromClaim", **({"requests": list(reqs)} if reqs else {}),
                     **{k: v for k, v in c.items() if k != "requests"}}
            if not reqs:
                config.append(entry)
                continue
            for ri, request in enumerate(requests):
                if request.get("name") in reqs:
                    config.append(entry)
                    break
                rd = self._selected(ci, ri)
                if rd.parent is not None and rd.full_name in reqs:
                    config.append(entry)
                    break
        for c in config:
            reqs = c.get("requests")
            if not reqs:
                continue
            if all(request.get("name") in reqs or self._selected(ci, ri).full_name in reqs
                   for ri, request in enumerate(requests)):
                c.pop("requests")
        return config

    def _node_selector(self, results: list[_Result]) -> dict | None:
        exprs: list[dict] = []
        fields: list[dict] = []
        for r in results:
            s = r.dev.slice
            if s.per_device and r.dev.node_selection is not None:
                node_name, selector = r.dev.node_selection[0], thaw(r.dev.node_selection[2]) if r.dev.node_selection[2] else None
            else:
                node_name, selector = s.node_name, s.node_selector
            if node_name or r.dev.binds_to_node:
                return {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [self.node.name]}]}]}
            if selector is not None:
                terms = selector.get("nodeSelectorTerms") or []
                if len(terms) > 1:
                    raise AllocationError(f"create NodeSelector for claim: unsupported ResourceSlice.NodeSelector with "
                                          f"{len(terms)} terms")
                if terms:
                    _add_requirements(terms[0].get("matchFields") or [], fields)
                    _add_requirements(terms[0].get("matchExpressions") or [], exprs)
        if not exprs and not fields:
            return None
        term: dict[str, Any] = {}
        if exprs:
            term["matchExpressions"] = exprs
        if fields:
            term["matchFields"] = fields
        return {"nodeSelectorTerms": [term]}


def _add_requirements(src: list[dict], dst: list[dict]) -> None:
    for r in src:
        if not any(x.get("key") == r.get("key") and x.get("operator") == r.get("operator")
                   and set(x.get("values") or []) == set(r.get("values") or []) for x in dst):
            dst.append(dict(r))


def _device_node_fits(node: Node, dev: CDevice) -> bool:
    if dev.node_selection is None:
        return False
    node_name, all_nodes, selector = dev.node_selection
    if node_name:
        return node.name == node_name
    if all_nodes:
        return True
    if selector:
        return node_matches(node, thaw(selector))
    return False
