"""``partita explain``: why a claim cannot be allocated, and the one change that would make it fit.

Runs the allocator itself (the same selectors, CEL, counters, capacity, taints and constraints the
controller uses, :class:`Allocator`), first to see whether the claim fits anywhere. When it does not,
it goes device by device, per request, through what the allocator checks, and counts what excluded each
published device, in this order:

* ``pool``: its resource pool is incomplete (being updated) or invalid;
* ``node``: published for no node the claim could use (the slice's nodeName/nodeSelector/allNodes, or
  the device's own node selection); such devices are not looked at further;
* ``class selector`` / ``request selector``: the DeviceClass's or the request's CEL selectors;
* ``taint``: a NoSchedule/NoExecute device taint the request does not tolerate;
* ``allocated``: a dedicated device another claim holds;
* ``counters``: the device's shared counters are used up by devices other claims hold (a GPU in another
  mode: a whole GPU next to its MIG devices, a MIG placement overlapping another);
* ``capacity``: a shared device without enough capacity left (or whose request policy refuses the amount);
* ``constraint``: outside the largest set of the node's remaining devices that satisfies the claim's
  ``matchAttribute``/``distinctAttribute`` constraints on the request (or lacking the attribute).

A device is counted once, under the first reason, and not at all when any node could use it. The
devices left per node say whether one node has enough; when one has, the claim's other requests or
constraints across requests rule the combination out. Then it tries single changes — a lower count, a
toleration, dropping one selector, a smaller capacity request, freeing the devices of one other claim,
dropping one constraint, dropping one request — and reports the first one with which the allocator finds
a solution (changes addressing the last stage that excluded devices first, as that is the one closest to
fitting), and up to two alternatives.

A pure analysis like the rest of the allocator library (no API calls, no files): ``partita explain``'s
command layer, :mod:`controller.explain_cmd`, reads the claim and what it is explained against from files
or the cluster and renders the :class:`Explanation`.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

from driver.api import constants as C
from driver.api import objects
from driver.api.quantity import Quantity
from driver.errors import PartitaError

from .allocator import Allocator, copy_claim_with_tolerations
from .constraints import lookup_attribute
from .devicetaints import RULE_FIELD
from .pools import CDevice, Pool, SliceIndex
from .search import Run, claim_ref, tolerates
from .types import AllocatedState, AllocationError, DeviceID, Features, Node

#: stage -> what it means (the order is the order of the checks)
STAGES = {
    "pool": "resource pool incomplete (being updated) or invalid",
    "node": "published for no node the claim can use",
    "class selector": "the DeviceClass's selectors",
    "request selector": "the request's own selectors",
    "taint": "a device taint the request does not tolerate",
    "allocated": "held by another claim",
    "counters": "shared counters used up by other claims' devices: the GPU is in use in another mode",
    "capacity": "not enough shared capacity left, or the device's request policy refuses the amount",
    "constraint": "the claim's matchAttribute/distinctAttribute constraints",
}
#: stage -> the kinds of change that address it (tried first when it is the last stage that excluded devices)
ADDRESSES = {"request selector": ("selector",), "taint": ("toleration",), "allocated": ("free",),
             "counters": ("free",), "capacity": ("capacity", "free"), "constraint": ("constraint",)}
EXAMPLES = 3
MAX_FREE_TRIES = 20
MAX_COUNT_TRIES = 8
MAX_ALTERNATIVES = 2
MAX_CHANGES = 60
#: search steps per node: the allocator's search is exhaustive (as upstream's), so a claim that does not fit
#: can take exponential time; explain gives up on a node after this many steps (a few seconds at most)
CLAIM_STEPS = 5_000
CHANGE_STEPS = 1_000
#: seconds spent trying changes at most
FIX_SECONDS = 20.0


class ExplainInputError(PartitaError, ValueError):
    """Input explain cannot use; the message names the file or object and the fix."""


@dataclass
class Stage:
    reason: str
    excluded: int = 0
    examples: list[str] = field(default_factory=list)
    meaning: str = ""


@dataclass
class RequestReport:
    request: str
    device_class: str
    needs: str
    published: int = 0
    stages: list[Stage] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)    # node -> devices left (constraints applied)
    verdict: str = ""


@dataclass
class Explanation:
    claim: str
    fits: bool
    node: str | None = None
    devices: list[str] = field(default_factory=list)
    requests: list[RequestReport] = field(default_factory=list)
    fix: str | None = None
    alternatives: list[str] = field(default_factory=list)
    #: nodes where the search gave up (too many combinations): the claim may still fit there
    undecided: list[str] = field(default_factory=list)
    #: limits that cut the search for a fix short
    notes: list[str] = field(default_factory=list)


@dataclass
class _Findings:
    """Per request, what the fixes need beyond the report."""

    taints: dict[tuple, dict] = field(default_factory=dict)          # (key, value, effect) -> taint
    health: Counter = field(default_factory=Counter)                  # health taint -> devices excluded by it
    blockers: Counter = field(default_factory=Counter)                # DeviceID held by others that excluded a device


_UNSEEN = object()


# -- the analysis ---------------------------------------------------------------------------------
class Explainer:
    def __init__(self, slices: Sequence[Mapping], classes: Mapping[str, Mapping],
                 allocated_claims: Sequence[Mapping] = (),
                 *, managed_toleration: bool = True, features: Features = Features(),
                 nodes: Sequence[Node] | None = None):
        self.slices = [dict(s) for s in slices]
        self.index = SliceIndex.from_slices(self.slices)
        self.classes = classes
        self.allocated_claims = [c for c in allocated_claims if objects.allocation(c)]
        self.managed_toleration = managed_toleration
        self.features = features
        named = self.index.node_names()
        given = list(nodes or ())
        self.nodes = given + [Node(n) for n in named if n not in {g.name for g in given}]
        #: DeviceID -> refs of the allocated claims holding it
        self.holders: dict[DeviceID, list[str]] = {}
        for c in self.allocated_claims:
            for r in objects.allocated_results(c):
                if not r.get("adminAccess"):
                    self.holders.setdefault(DeviceID(r["driver"], r["pool"], r["device"]), []).append(claim_ref(c))

    def _state(self, without: str | None = None) -> AllocatedState:
        state = AllocatedState()
        for c in self.allocated_claims:
            if claim_ref(c) != without:
                state.add_allocation(objects.allocation(c), self.features.consumable_capacity)
        return state

    def _input(self, claim: Mapping) -> dict:
        return copy_claim_with_tolerations(claim, [C.managed_toleration()]) if self.managed_toleration else dict(claim)

    def _try(self, claim: Mapping, state: AllocatedState | None = None, steps: int = CHANGE_STEPS,
             reasons: int = 0):  # noqa: ANN202
        allocator = Allocator(self.features, "first-fit", max_steps=steps)
        return allocator.allocate_on_nodes(self.nodes, [self._input(claim)], self.index, self.classes,
                                           state if state is not None else self._state(), max_reasons=reasons)

    def explain(self, claim: Mapping) -> Explanation:
        """Raises :class:`AllocationError` for a claim the allocator refuses as bad input (unknown class,
        CEL error, count, ...) and :class:`ExplainInputError` when there is nothing to explain against."""
        if not self.nodes:
            raise ExplainInputError("no ResourceSlice names a node (spec.nodeName), and no nodes were given: pass "
                                    "the slices of the nodes the claim could use, or the Node objects (--nodes)")
        out = Explanation(claim=claim_ref(claim), fits=False)
        choice = self._try(claim, steps=CLAIM_STEPS, reasons=len(self.nodes))
        out.undecided = sorted(n for n, why in choice.unsatisfiable_reasons.items() if "search" in why and
                               "gave up after" in why)
        if choice.node is not None:
            out.fits, out.node = True, choice.node.name
            out.devices = [f"{r['pool']}/{r['device']}" for r in choice.results[0]["devices"]["results"]]
            return out
        out.requests, findings = self._funnel(claim)
        out.fix, out.alternatives = self._fix(claim, out.requests, findings, out.notes)
        if any(key[0] == C.MANAGED_TAINT_KEY for f in findings.values() for key in f.taints):
            out.notes.append(f"devices carry Partita's taint {C.MANAGED_TAINT_KEY}: kube-scheduler leaves them to "
                             "Partita's controller, which allocates such claims itself (--allocation-mode controller "
                             "shows how it sees this claim)")
        for key in sorted({k for f in findings.values() for k in f.taints if k[0] == C.HEALTH_TAINT_KEY}, key=str):
            n = sum(f.health.get(key, 0) for f in findings.values())
            out.notes.append(f"{n} device(s) carry the health taint {key[0]}={key[1]}:{key[2]}: their GPU or MIG "
                             f"instance is {key[1]} (the node's driver watches GPU health, docs/health.md); the taint "
                             "goes when the GPU has recovered")
        for key, rule in sorted({(k, t[RULE_FIELD]) for f in findings.values() for k, t in f.taints.items()
                                 if t.get(RULE_FIELD)}, key=str):
            value = f"={key[1]}" if key[1] else ""
            out.notes.append(f"the taint {key[0]}{value}:{key[2]} is set by DeviceTaintRule {rule} (an administrator's "
                             "rule, e.g. maintenance), not by the driver")
        return out

    # -- per request, what excluded each device --------------------------------------------------------
    def _funnel(self, claim: Mapping) -> tuple[list[RequestReport], dict[str, _Findings]]:
        allocator = Allocator(self.features, "first-fit")
        state = self._state()
        claims = [self._input(claim)]
        reports: dict[str, RequestReport] = {}
        findings: dict[str, _Findings] = {}
        outcome: dict[str, dict[DeviceID, str | None]] = {}
        bad_pools: set[tuple[str, str]] = set()
        for node in self.nodes:
            run = allocator.trial(node, claims, self.index, self.classes, state)
            bad_pools.update(p.id for p in run.pools if p.incomplete or p.invalid)
            pools = [p for p in run.pools if not (p.incomplete or p.invalid)]
            for key, rd in sorted(run.req.items()):
                if rd.full_name not in reports:
                    need = str(rd.num_devices) if rd.mode == "ExactCount" else "all"
                    cls = (rd.cls or {}).get("metadata", {}).get("name", "?")
                    reports[rd.full_name] = RequestReport(rd.full_name, cls, need)
                    findings[rd.full_name] = _Findings()
                    outcome[rd.full_name] = {}
                seen, found = outcome[rd.full_name], findings[rd.full_name]
                left: list[CDevice] = []
                for pool in pools:
                    passing = {id(d): failure for d, failure in run.class_list(pool, rd)}
                    for dev in pool.devices():
                        reason = run.exclusion(key, rd, pool, dev, passing.get(id(dev), False))
                        if reason is None:
                            left.append(dev)
                            continue
                        _merge(seen, dev.id, reason)
                        self._note(found, reason, rd, dev, pool, state)
                kept = _constrained(run, rd, left)
                for dev in left:
                    _merge(seen, dev.id, None if id(dev) in kept else "constraint")
                reports[rd.full_name].candidates[node.name] = len(kept)
        published = self._published()
        for name, rep in reports.items():
            seen = outcome[name]
            stages = {s: Stage(s, meaning=m) for s, m in STAGES.items()}
            rep.published = len(published)
            for did in published:
                reason = seen.get(did, _UNSEEN)
                if reason is _UNSEEN:
                    reason = "pool" if (did.driver, did.pool) in bad_pools else "node"
                if reason is None:
                    continue
                st = stages[reason]
                st.excluded += 1
                if len(st.examples) < EXAMPLES:
                    st.examples.append(f"{did.pool}/{did.device}")
            rep.stages = [s for s in stages.values() if s.excluded]
            rep.verdict = _verdict(rep)
        return list(reports.values()), findings

    def _published(self) -> list[DeviceID]:
        out, seen = [], set()
        for s in sorted(self.index.slices(), key=lambda s: (s.driver, s.pool, s.name)):
            for d in s.devices:
                if d.id not in seen:
                    seen.add(d.id)
                    out.append(d.id)
        return out

    def _note(self, found: _Findings, reason: str, rd, dev: CDevice, pool: Pool,  # noqa: ANN001
              state: AllocatedState) -> None:
        if reason == "taint":
            for t in dev.taints:
                if t.get("effect") in ("NoSchedule", "NoExecute") and not any(tolerates(x, t) for x in rd.tolerations):
                    found.taints.setdefault((t.get("key"), t.get("value"), t.get("effect")), dict(t))
                    if t.get("key") == C.HEALTH_TAINT_KEY:
                        found.health[(t.get("key"), t.get("value"), t.get("effect"))] += 1
        elif reason in ("allocated", "capacity"):
            found.blockers[dev.id] += 1
        elif reason == "counters":
            sets = {cs for cs, _ in dev.consumes}
            for name in state.allocated_in_pool(pool.driver, pool.name):
                other = pool.by_name.get(name)
                if other is not None and sets & {cs for cs, _ in other.consumes}:
                    found.blockers[other.id] += 1

    # -- a single change that makes it fit ---------------------------------------------------------
    def _fix(self, claim: Mapping, reports: list[RequestReport], findings: dict[str, _Findings],
             notes: list[str]) -> tuple[str | None, list[str]]:
        """The first change with which the claim fits, and up to MAX_ALTERNATIVES others."""
        preferred = {k for r in reports if r.stages for k in ADDRESSES.get(r.stages[-1].reason, ())}
        changes = list(self._changes(claim, reports, findings))
        changes.sort(key=lambda c: c[0] not in preferred)          # stable: otherwise the order of _changes
        found: list[str] = []
        done: set[str] = set()       # one answer per field: the largest count that fits, not every smaller one
        deadline = time.monotonic() + FIX_SECONDS
        for n, (kind, description, changed, state) in enumerate(changes[:MAX_CHANGES]):
            if time.monotonic() > deadline:
                notes.append(f"stopped trying changes after {FIX_SECONDS:.0f}s ({n} of {len(changes)} tried)")
                break
            group = description.split(" from ")[0].split(" instead of ")[-1] if kind in ("count", "capacity") else ""
            if group and group in done:
                continue
            try:
                if self._try(changed, state).node is not None:
                    found.append(description)
                    done.add(group)
            except AllocationError:
                continue
            if len(found) > MAX_ALTERNATIVES:
                break
        return (found[0] if found else None), found[1:]

    def _changes(self, claim: Mapping, reports: list[RequestReport],
                 findings: dict[str, _Findings]) -> Iterator[tuple[str, str, dict, AllocatedState | None]]:
        """(kind, description, changed claim, allocated state or None for the current one)."""
        devices = (claim.get("spec") or {}).get("devices") or {}
        requests = objects.device_requests(claim)
        by_name = {r.request: r for r in reports}
        for rs in objects.request_specs(claim):
            rep = by_name.get(rs.full_name)
            locate = _locator(rs.path)
            spec = locate(claim)
            if rep is None or spec is None:
                continue
            yield from self._spec_changes(claim, rs.path, spec, locate, rep, findings.get(rs.full_name) or _Findings())
        for description, state in self._free_changes(claim, findings):
            yield "free", description, claim, state
        for k, _ in enumerate(devices.get("constraints") or []):
            changed = copy.deepcopy(dict(claim))
            changed["spec"]["devices"]["constraints"].pop(k)
            yield "constraint", f"remove spec.devices.constraints[{k}]", changed, None
        if len(requests) > 1:
            for i, req in enumerate(requests):
                changed = copy.deepcopy(dict(claim))
                changed["spec"]["devices"]["requests"].pop(i)
                yield "request", f"remove spec.devices.requests[{i}] (request {req.get('name')})", changed, None

    def _spec_changes(self, claim: Mapping, where: str, spec: Mapping, locate: Callable, rep: RequestReport,
                      found: _Findings) -> Iterator[tuple[str, str, dict, None]]:
        def edit(change: Callable[[dict], None]) -> dict:
            c = copy.deepcopy(dict(claim))
            change(locate(c))
            return c

        count = spec.get("count", 1)
        if spec.get("allocationMode", "ExactCount") == "ExactCount" and isinstance(count, int) and count > 1:
            best = max(rep.candidates.values(), default=0)
            top = min(best, count - 1)
            for n in range(top, max(0, top - MAX_COUNT_TRIES), -1):
                yield ("count", f"lower {where}.count from {count} to {n}",
                       edit(lambda e, n=n: e.__setitem__("count", n)), None)
        for taint in found.taints.values():
            if taint.get("key") in (C.MANAGED_TAINT_KEY, C.HEALTH_TAINT_KEY):
                continue       # Partita's own taints (the health taint: a failing GPU, see the note); never advise users to
            tol = {"key": taint["key"], "operator": "Exists", "effect": taint["effect"]}
            origin = f" of DeviceTaintRule {taint[RULE_FIELD]}" if taint.get(RULE_FIELD) else ""
            yield ("toleration", f"add the toleration {json.dumps(tol)} to {where}.tolerations (devices carry "
                   f"the taint {taint['key']}={taint.get('value', '')}:{taint['effect']}{origin})",
                   edit(lambda e, t=tol: e.setdefault("tolerations", []).append(t)), None)
        for j, sel in enumerate(spec.get("selectors") or []):
            expr = (sel.get("cel") or {}).get("expression", "")
            yield ("selector", f"remove {where}.selectors[{j}] ({expr})",
                   edit(lambda e, j=j: e["selectors"].pop(j)), None)
        for name, amount in ((spec.get("capacity") or {}).get("requests") or {}).items():
            try:
                asked = Quantity.parse(amount)
            except ValueError:
                continue
            free = self._largest_free(name)
            if free is None or not free < asked:
                continue
            # the device's request policy may round a request up: offer whole GiB, then MiB
            for unit, suffix in ((1 << 30, "Gi"), (1 << 20, "Mi")):
                whole = free.as_int() // unit
                if whole > 0:
                    q = f"{whole}{suffix}"
                    yield ("capacity", f"ask for {q} instead of {amount} in {where}.capacity.requests.{name} "
                           "(the most any shared device has left)",
                           edit(lambda e, n=name, q=q: e["capacity"]["requests"].__setitem__(n, q)), None)

    def _free_changes(self, claim: Mapping, findings: dict[str, _Findings]) -> Iterator[tuple[str, AllocatedState]]:
        """Free one other claim: first those holding the devices that excluded the most candidates, then
        any other allocated claim (the allocator decides which would help)."""
        ref = claim_ref(claim)
        weight: Counter = Counter()
        held: dict[str, list[DeviceID]] = {}
        for found in findings.values():
            for did, n in found.blockers.items():
                for holder in self.holders.get(did, ()):
                    weight[holder] += n
                    if did not in held.setdefault(holder, []):
                        held[holder].append(did)
        order = [h for h, _ in weight.most_common()]
        order += [claim_ref(c) for c in self.allocated_claims if claim_ref(c) not in weight]
        tried = 0
        for holder in order:
            if holder == ref:
                continue
            if tried >= MAX_FREE_TRIES:
                break
            tried += 1
            devices = held.get(holder) or [d for d, hs in self.holders.items() if holder in hs]
            names = ", ".join(f"{d.pool}/{d.device}" for d in devices[:EXAMPLES])
            more = f" and {len(devices) - EXAMPLES} more" if len(devices) > EXAMPLES else ""
            yield (f"free {names}{more} held by claim {holder} (delete that claim, or the pods using it)",
                   self._state(without=holder))

    def _largest_free(self, name: str) -> Quantity | None:
        state = self._state()
        best = None
        for s in self.index.slices():
            for d in s.devices:
                if not d.allow_multiple:
                    continue
                total = next((q for n, q, _ in d.capacity if n == name), None)
                if total is None:
                    continue
                free = total - state.capacity.get(d.id, {}).get(name, Quantity.from_int(0))
                if best is None or best < free:
                    best = free
        return best if best is not None and best.sign() > 0 else None


def _merge(seen: dict, did: DeviceID, reason: str | None) -> None:
    """A device usable on any node is not excluded; "node" gives way to a reason from a node that can use it."""
    prev = seen.get(did, _UNSEEN)
    if prev is _UNSEEN or reason is None or prev == "node":
        if prev is not None:
            seen[did] = reason


def _constrained(run: Run, rd, devices: list[CDevice]) -> set[int]:  # noqa: ANN001
    """ids of the largest subset of ``devices`` that the claim's constraints on this request accept
    together, found with the allocator's own constraint objects (fresh ones, one try per value)."""
    kept = list(devices)
    base, sub = (rd.parent, rd.name) if rd.parent else (rd.name, "")
    for c in run.constraints[rd.claim_index]:
        if not c.applies(base, sub):
            continue
        best: list[CDevice] = []
        anchors: dict[object, CDevice] = {}
        for dev in kept:
            value = lookup_attribute(dev, c.attribute)
            if value is not None and value[0]:
                anchors.setdefault(value, dev)
        for anchor in anchors.values():
            fresh = type(c)(c.requests, c.attribute)
            group = [d for d in [anchor] + [d for d in kept if d is not anchor] if fresh.add(base, sub, d)]
            if len(group) > len(best):
                best = group
        kept = best
    return {id(d) for d in kept}


def _verdict(rep: RequestReport) -> str:
    node, most = max(rep.candidates.items(), key=lambda kv: kv[1], default=("-", 0))
    if rep.needs == "all":
        return "asks for all matching devices of a node" + ("" if most else "; no node has any left")
    if most < int(rep.needs):
        return f"needs {rep.needs} on one node; the most any node has left is {most}" + (f" ({node})" if most else "")
    return (f"node {node} has {most} candidate(s), enough alone; the claim's other requests, or constraints "
            "across requests, rule the combination out")


def _locator(path: str) -> Callable[[Mapping], dict | None]:
    """A function finding the (sub)request at field ``path`` (a :class:`objects.RequestSpec` path) in a copy
    of the claim, to edit it there; None where the copy has no such object."""
    def locate(c: Mapping) -> dict | None:
        spec = next((rs.spec for rs in objects.request_specs(c) if rs.path == path), None)
        return spec if isinstance(spec, dict) and spec else None
    return locate


# -- rendering ------------------------------------------------------------------------------------
def render(e: Explanation, wide: bool = False) -> str:
    """The explanation as text; ``wide`` also lists each chosen device on its own line and, for a claim
    that does not fit, every node's devices left (nodes with none included)."""
    if e.fits:
        head = f"claim {e.claim} fits: node {e.node}, devices {', '.join(e.devices)}"
        return "\n".join([head, *(f"  device {d}" for d in e.devices)]) if wide else head
    lines = [f"claim {e.claim} cannot be allocated:"]
    for r in e.requests:
        lines.append(f"  request {r.request} (class {r.device_class}, needs {r.needs}): "
                     f"{r.published} device(s) published")
        for s in r.stages:
            ex = f"; e.g. {', '.join(s.examples)}" if s.examples else ""
            lines.append(f"    - {s.excluded:>5} excluded by {s.reason} ({s.meaning}){ex}")
        left = ", ".join(f"{n} {k}" for n, k in sorted(r.candidates.items(), key=lambda kv: -kv[1])
                         if k or wide) or "none"
        lines.append(f"    = left on a node: {left}")
        lines.append(f"    {r.verdict}")
    if e.undecided:
        lines.append(f"  the search gave up on {len(e.undecided)} node(s) after {CLAIM_STEPS} steps each (too many "
                     f"combinations); the claim may fit there: {', '.join(e.undecided[:EXAMPLES])}")
    lines.append(f"fix: {e.fix}" if e.fix else "fix: no single change makes it fit")
    lines.extend(f"  or: {a}" for a in e.alternatives)
    lines.extend(f"note: {n}" for n in e.notes)
    return "\n".join(lines)


__all__ = ["ADDRESSES", "STAGES", "ExplainInputError", "Explainer", "Explanation", "RequestReport", "Stage", "render"]
