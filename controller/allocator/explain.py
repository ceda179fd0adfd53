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

Inputs are files (claim or template, slices, classes, nodes, other allocated claims; one multi-document
``-f`` file may hold them all, with ``--claim NAME`` picking one of several claims) or the cluster
(``--kubeconfig``/``--context``/``-n``, the claim's namespace defaulting to the context's).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import yaml

from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.api.quantity import Quantity
from driver.cliopts import add_cluster, add_output
from driver.errors import PartitaError

from .allocator import Allocator, copy_claim_with_tolerations
from .constraints import lookup_attribute
from .devicetaints import GROUP as TAINT_RULE_GROUP, KIND as TAINT_RULE_KIND, PLURAL as TAINT_RULE_PLURAL
from .devicetaints import RULE_FIELD, TaintRules, discover_version
from .pools import CDevice, Pool, SliceIndex, available_counters
from .search import Run, _device_node_fits, claim_ref, taint_prevents, tolerates
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
        self.allocated_claims = [c for c in allocated_claims if (c.get("status") or {}).get("allocation")]
        self.managed_toleration = managed_toleration
        self.features = features
        named = self.index.node_names()
        given = list(nodes or ())
        self.nodes = given + [Node(n) for n in named if n not in {g.name for g in given}]
        #: DeviceID -> refs of the allocated claims holding it
        self.holders: dict[DeviceID, list[str]] = {}
        for c in self.allocated_claims:
            for r in ((c["status"]["allocation"].get("devices") or {}).get("results") or []):
                if not r.get("adminAccess"):
                    self.holders.setdefault(DeviceID(r["driver"], r["pool"], r["device"]), []).append(claim_ref(c))

    def _state(self, without: str | None = None) -> AllocatedState:
        state = AllocatedState()
        for c in self.allocated_claims:
            if claim_ref(c) != without:
                state.add_allocation(c["status"]["allocation"], self.features.consumable_capacity)
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
            run = allocator._run(node, claims, self.index, self.classes, state)   # noqa: SLF001 - same package
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
                    avail = available_counters(pool, state)
                    for dev in pool.devices():
                        reason = _exclusion(run, key, rd, dev, passing, avail, state)
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
        requests = devices.get("requests") or []
        by_name = {r.request: r for r in reports}
        for i, req in enumerate(requests):
            for where, name, locate in _request_specs(i, req):
                rep = by_name.get(name)
                spec = locate(claim)
                if rep is None or spec is None:
                    continue
                yield from self._spec_changes(claim, where, spec, locate, rep, findings.get(name) or _Findings())
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
            if taint.get("key") == C.MANAGED_TAINT_KEY:
                continue       # Partita's own taint: the controller tolerates it; never advise users to
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


def _exclusion(run: Run, key: tuple, rd, dev: CDevice, passing: dict, avail: dict,  # noqa: ANN001
               state: AllocatedState) -> str | None:
    """The first of the allocator's own checks that rules ``dev`` out for the request, or None."""
    if dev.slice.per_device and not _device_node_fits(run.node, dev):
        return "node"
    failure = passing.get(id(dev), False)
    if failure is False:
        return "class selector"
    if failure is not None:
        run._raise_selector_error(rd, dev, failure, from_class=True)   # noqa: SLF001
    if not run.request_ok(key, rd, dev):
        return "request selector"
    if run.f.device_taints and taint_prevents(dev, rd.tolerations):
        return "taint"
    multi = run.f.consumable_capacity and dev.allow_multiple
    if not rd.admin and dev.id in state.devices:
        return "allocated"
    if not run.f.partitionable_devices and dev.consumes:
        return "counters"
    if dev.consumes and not (multi and dev.id in state.capacity):
        for cs, counters in dev.consumes:
            have = avail.get(cs, {})
            if any(have.get(c, 0) < v for c, v in counters):
                return "counters"
    if run.f.consumable_capacity and not run._capacity_fits(rd, dev):   # noqa: SLF001
        return "capacity"
    return None


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


def _request_specs(i: int, req: Mapping) -> Iterator[tuple[str, str, Callable[[Mapping], dict | None]]]:
    """(field path, report name, function finding that spec in a copy of the claim) per (sub)request."""
    def at(*path: object) -> Callable[[Mapping], dict | None]:
        def locate(c: Mapping) -> dict | None:
            node: object = c
            for p in ("spec", "devices", "requests", i, *path):
                try:
                    node = node[p]  # type: ignore[index]
                except (KeyError, IndexError, TypeError):
                    return None
            return node if isinstance(node, dict) else None
        return locate

    name = req.get("name", "")
    if "exactly" in req:
        yield f"spec.devices.requests[{i}].exactly", name, at("exactly")
    for j, sub in enumerate(req.get("firstAvailable") or []):
        yield (f"spec.devices.requests[{i}].firstAvailable[{j}]", f"{name}/{sub.get('name', '')}",
               at("firstAvailable", j))


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


# -- inputs ---------------------------------------------------------------------------------------
def _load_docs(paths: Sequence[Path], what: str) -> list[dict]:
    docs: list[dict] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted([*p.glob("*.yaml"), *p.glob("*.yml"), *p.glob("*.json")])
            if not files:
                raise ExplainInputError(f"{what}: directory {p} holds no .yaml, .yml or .json file")
        else:
            files = [p]
        for f in files:
            try:
                loaded = list(yaml.safe_load_all(f.read_text()))
            except OSError as e:
                raise ExplainInputError(f"{what}: cannot read {f}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise ExplainInputError(f"{what}: {f} is not valid YAML or JSON: {e}") from None
            for d in loaded:
                if isinstance(d, dict) and str(d.get("kind", "")).endswith("List"):
                    docs.extend(x for x in d.get("items") or [] if isinstance(x, dict))
                elif isinstance(d, dict):
                    docs.append(d)
                elif d is not None:
                    raise ExplainInputError(f"{what}: {f} holds a {type(d).__name__}, not a Kubernetes object")
    return docs


def claim_from(doc: Mapping, where: str) -> dict:
    kind = doc.get("kind")
    if kind == "ResourceClaimTemplate":
        md = doc.get("metadata") or {}
        claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                 "metadata": {"name": md.get("name", "template"), "namespace": md.get("namespace", "default")},
                 "spec": copy.deepcopy((doc.get("spec") or {}).get("spec") or {})}
    elif kind == "ResourceClaim":
        claim = copy.deepcopy(dict(doc))
    else:
        raise ExplainInputError(f"{where}: expected a ResourceClaim or ResourceClaimTemplate, got kind {kind!r}")
    name = (claim.get("metadata") or {}).get("name")
    requests = ((claim.get("spec") or {}).get("devices") or {}).get("requests")
    if not isinstance(requests, list) or not requests:
        raise ExplainInputError(f"{where}: {kind} {name!r} has no spec.devices.requests; a claim needs at least "
                                "one request")
    for i, r in enumerate(requests):
        if not isinstance(r, dict) or not r.get("name") or ("exactly" not in r and "firstAvailable" not in r):
            raise ExplainInputError(f"{where}: {kind} {name!r}: spec.devices.requests[{i}] needs a name and either "
                                    "exactly or firstAvailable")
    return claim


def _with_taint_rules(slices: list[dict], rules: Sequence[Mapping], classes: Mapping[str, Mapping],
                      where: str) -> list[dict]:
    """The slices with the DeviceTaintRules' taints merged in (controller.allocator.devicetaints)."""
    wrong = sorted({str(r.get("kind")) for r in rules if r.get("kind", TAINT_RULE_KIND) != TAINT_RULE_KIND})
    if wrong:
        raise ExplainInputError(f"{where}: expected DeviceTaintRule objects, found {', '.join(wrong)}")
    merged = TaintRules(rules, classes)
    if merged.problems:
        raise ExplainInputError(f"{where}: " + "; ".join(merged.problems[n] for n in sorted(merged.problems)))
    return [dict(s) for s in merged.patch_all(slices)]


def _nodes(docs: Sequence[Mapping]) -> list[Node]:
    return [Node(d["metadata"]["name"], dict((d["metadata"].get("labels") or {})))
            for d in docs if d.get("kind") == "Node" and (d.get("metadata") or {}).get("name")]


async def _from_cluster(args: argparse.Namespace, claim_name: str | None) -> dict:
    from driver.api.kube import (CLAIMS, DEVICE_CLASSES, NODES, SLICES, InvalidName, KubeError, check_name,
                                 check_namespace, claim_path)
    from driver.cliopts import connect, where as where_of

    if claim_name:      # a hostile or malformed name is refused before anything is sent, or even connected
        given_ns, _, given_name = claim_name.rpartition("/")
        try:
            check_name(given_name, "ResourceClaim name")
            if given_ns:
                check_namespace(given_ns, "ResourceClaim namespace")
        except InvalidName as e:
            raise ExplainInputError(f"--claim {claim_name}: {e}; give it as NAME (with -n NAMESPACE) or "
                                    "NAMESPACE/NAME") from None
    where = where_of(args)
    try:
        kube = await connect(args)
    except Exception as e:  # noqa: BLE001 - no kubeconfig, bad URL: a clear message, not a traceback
        raise ExplainInputError(f"cannot reach the API server ({where}): {e}; pass --kubeconfig FILE, --context "
                                "NAME or --kube-api URL, or give the slices as files (--slices)") from None
    try:
        out: dict = {}
        if claim_name:
            ns, _, name = claim_name.rpartition("/")
            ns = ns or getattr(args, "namespace", None) or kube.namespace
            try:
                out["claim"] = await kube.get(claim_path(ns, name))
            except InvalidName as e:
                raise ExplainInputError(f"--claim {claim_name}: {e}; give it as NAME (with -n NAMESPACE) or "
                                        "NAMESPACE/NAME") from None
            except KubeError as e:
                if e.not_found:
                    raise ExplainInputError(f"--claim {claim_name}: ResourceClaim {name} not found in namespace "
                                            f"{ns}; give it as NAME with -n NAMESPACE, or as NAMESPACE/NAME") from None
                raise
        for key, kind, path in (("slices", "ResourceSlice", SLICES), ("classes", "DeviceClass", DEVICE_CLASSES),
                                ("claims", "ResourceClaim", CLAIMS), ("nodes", "Node", NODES)):
            try:
                items = (await kube.list(path)).get("items") or []
            except KubeError:
                if key != "nodes":
                    raise
                items = []          # not allowed to list nodes: the nodes the slices name still count
            out[key] = [{"kind": kind, **i} for i in items]
        out["taintrules"] = await _cluster_taint_rules(kube)
        return out
    except KubeError as e:
        raise ExplainInputError(f"reading from the API server ({where}): {e}") from None
    except (OSError, asyncio.TimeoutError) as e:
        raise ExplainInputError(f"cannot reach the API server ({where}): {e}; pass --kubeconfig FILE, --context "
                                "NAME or --kube-api URL, or give the slices as files (--slices)") from None
    except Exception as e:  # noqa: BLE001 - a client library error: a clear message, not a traceback
        if isinstance(e, ExplainInputError):
            raise
        raise ExplainInputError(f"reading from the API server ({where}): {type(e).__name__}: {e}") from None
    finally:
        await kube.close()


async def _cluster_taint_rules(kube) -> list[dict]:  # noqa: ANN001
    """The cluster's DeviceTaintRules, in the version discovery says it serves (none when it serves none)."""
    from driver.api.kube import KubeError

    version = await discover_version(kube)
    if version is None:
        return []
    try:
        items = (await kube.list(f"/apis/{TAINT_RULE_GROUP}/{version}/{TAINT_RULE_PLURAL}")).get("items") or []
    except KubeError:
        return []     # not allowed to list them: explain as the slices are published
    return [{"kind": TAINT_RULE_KIND, **i} for i in items]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--claim-file", type=Path,
                   help="a ResourceClaim or ResourceClaimTemplate (YAML/JSON); a multi-document file may also hold "
                        "the ResourceSlices, DeviceClasses, allocated claims, Nodes and DeviceTaintRules to explain "
                        "against, and several claims (pick one with --claim NAME)")
    p.add_argument("--claim", metavar="[NAMESPACE/]NAME",
                   help="the claim in the cluster (namespace: -n, else the kubeconfig context's), or, with -f, the "
                        "claim of that name in the file")
    p.add_argument("--slices", type=Path, nargs="+", metavar="PATH",
                   help="ResourceSlice files or directories (e.g. `partita inventory --fake H100-SXM5-80GB:8 -o yaml` "
                        "output); default: the cluster's")
    p.add_argument("--classes", type=Path, nargs="+", metavar="PATH",
                   help="DeviceClass files (default: the cluster's with --slices absent, else Partita's shipped "
                        "classes)")
    p.add_argument("--allocated", type=Path, nargs="+", metavar="PATH",
                   help="other allocated ResourceClaims, whose devices, counters and capacity are in use "
                        "(default: the cluster's with --slices absent)")
    p.add_argument("--nodes", type=Path, nargs="+", metavar="PATH",
                   help="Node objects, for slices that select nodes by label (default: the cluster's with --slices "
                        "absent; the nodes the slices name are always included)")
    p.add_argument("--taint-rules", type=Path, nargs="+", metavar="PATH",
                   help="DeviceTaintRule files, merged into the devices' taints as kube-scheduler does (default: the "
                        "cluster's with --slices absent)")
    p.add_argument("--allocation-mode", choices=C.ALLOCATION_MODES, default=C.ALLOCATION_MODE_CONTROLLER,
                   help="controller (default): the claim tolerates Partita's managed taint, as the controller "
                        "makes it; scheduler: as kube-scheduler sees it")
    add_cluster(p)
    add_output(p, help_="table (default: the explanation), wide (every node's devices left, each device chosen), "
                        "yaml or json")


def run(args: argparse.Namespace) -> int:
    try:
        explanation = _run(args)
    except (ExplainInputError, AllocationError) as e:
        print(f"partita explain: {e}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(asdict(explanation), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(asdict(explanation), sort_keys=False), end="")
    else:
        print(render(explanation, wide=args.output == "wide"))
    return 0 if explanation.fits else 1


#: kinds a multi-document ``-f`` file may hold besides the claim, and the flag each stands in for
_FILE_KINDS = {"ResourceSlice": "--slices", "DeviceClass": "--classes", "Node": "--nodes",
               TAINT_RULE_KIND: "--taint-rules"}
_CLAIM_KINDS = ("ResourceClaim", "ResourceClaimTemplate")


def _split_claim_file(path: Path, pick: str | None) -> tuple[dict, dict[str, list[dict]], list[dict]]:
    """The claim of a ``-f`` file (the only one, or the one ``pick`` names), the other objects by kind, and
    the file's other claims (those allocated count as allocated)."""
    docs = _load_docs([path], "claim")
    claims = [d for d in docs if d.get("kind") in _CLAIM_KINDS]
    others: dict[str, list[dict]] = {k: [d for d in docs if d.get("kind") == k] for k in _FILE_KINDS}
    unknown = sorted({str(d.get("kind")) for d in docs if d.get("kind") not in (*_CLAIM_KINDS, *_FILE_KINDS)})
    if unknown and not claims:
        raise ExplainInputError(f"{path}: expected a ResourceClaim or ResourceClaimTemplate, got kind "
                                f"{unknown[0]!r}")
    if unknown:
        raise ExplainInputError(f"{path}: holds {', '.join(unknown)}; a claim file may hold ResourceClaims, "
                                f"ResourceClaimTemplates, {', '.join(_FILE_KINDS)} objects only")
    if not claims:
        raise ExplainInputError(f"{path}: holds no ResourceClaim or ResourceClaimTemplate")

    def ref(d: Mapping) -> str:
        md = d.get("metadata") or {}
        return f"{md.get('namespace') or 'default'}/{md.get('name', '')}"

    if pick:
        ns, _, name = pick.rpartition("/")
        chosen = [d for d in claims if (d.get("metadata") or {}).get("name") == name
                  and (not ns or ref(d).split("/")[0] == ns)]
        if len(chosen) != 1:
            held = ", ".join(ref(d) for d in claims)
            what = "several claims match" if chosen else "no claim matches"
            raise ExplainInputError(f"--claim {pick}: {what} in {path} (it holds {held}); give it as NAME or "
                                    "NAMESPACE/NAME")
    elif len(claims) > 1:
        raise ExplainInputError(f"{path}: holds {len(claims)} claims ({', '.join(ref(d) for d in claims)}); pick "
                                "one with --claim NAME")
    else:
        chosen = claims
    rest = [d for d in claims if d is not chosen[0] and d.get("kind") == "ResourceClaim"]
    return claim_from(chosen[0], str(path)), others, rest


def _run(args: argparse.Namespace) -> Explanation:
    if not args.claim_file and not args.claim:
        raise ExplainInputError("give the claim either as a file (-f FILE) or as [NAMESPACE/]NAME in the cluster "
                                "(--claim)")
    in_file: dict[str, list[dict]] = {}
    file_claims: list[dict] = []
    if args.claim_file:
        claim, in_file, file_claims = _split_claim_file(args.claim_file, args.claim)
    for kind, flag in _FILE_KINDS.items():
        if in_file.get(kind) and getattr(args, flag[2:].replace("-", "_"), None):
            raise ExplainInputError(f"{args.claim_file} holds {kind} objects and {flag} gives more; give them in "
                                    "one place")
    file_slices = in_file.get("ResourceSlice") or []
    cluster: dict = {}
    if not args.claim_file or not (args.slices or file_slices):
        cluster = asyncio.run(_from_cluster(args, None if args.claim_file else args.claim))
    if not args.claim_file:
        claim = claim_from(cluster["claim"], f"claim {args.claim}")
    from_cluster = not args.slices and not file_slices
    slices = _load_docs(args.slices, "--slices") if args.slices else file_slices or cluster["slices"]
    wrong = sorted({str(s.get("kind")) for s in slices if s.get("kind", "ResourceSlice") != "ResourceSlice"})
    slices = [s for s in slices if s.get("kind", "ResourceSlice") == "ResourceSlice"]
    if not slices:
        raise ExplainInputError("no ResourceSlices found" + (f" (only {', '.join(wrong)})" if wrong else "") +
                                (" in the cluster: is the Partita plugin running on the GPU nodes?" if from_cluster
                                 else " in --slices: pass files or directories of ResourceSlice objects"))
    if args.classes or in_file.get("DeviceClass"):
        classes_list = _load_docs(args.classes, "--classes") if args.classes else in_file["DeviceClass"]
    elif from_cluster:
        classes_list = cluster["classes"]
    else:
        drivers = sorted({(s.get("spec") or {}).get("driver") or C.DEFAULT_DRIVER_NAME for s in slices})
        classes_list = [c for d in drivers for c in device_classes(d)]
    classes = {c["metadata"]["name"]: c for c in classes_list
               if c.get("kind", "DeviceClass") == "DeviceClass" and (c.get("metadata") or {}).get("name")}
    if args.allocated:
        allocated = [c for c in _load_docs(args.allocated, "--allocated")
                     if c.get("kind", "ResourceClaim") == "ResourceClaim"]
    else:
        allocated = cluster.get("claims", []) if from_cluster or (args.claim and not args.claim_file) else []
    allocated = allocated + [c for c in file_claims if (c.get("status") or {}).get("allocation")]
    nodes = _nodes(_load_docs(args.nodes, "--nodes")) if args.nodes else \
        _nodes(in_file.get("Node") or cluster.get("nodes", []))
    taint_rules = getattr(args, "taint_rules", None)
    rules = _load_docs(taint_rules, "--taint-rules") if taint_rules else \
        in_file.get(TAINT_RULE_KIND) or cluster.get("taintrules", [])
    if rules:
        slices = _with_taint_rules(slices, rules, classes, "--taint-rules" if taint_rules else
                                   str(args.claim_file) if in_file.get(TAINT_RULE_KIND) else "the cluster")
    explainer = Explainer(slices, classes, [c for c in allocated if claim_ref(c) != claim_ref(claim)],
                          managed_toleration=args.allocation_mode == C.ALLOCATION_MODE_CONTROLLER, nodes=nodes)
    return explainer.explain(claim)


__all__ = ["STAGES", "ExplainInputError", "Explainer", "Explanation", "RequestReport", "add_arguments", "render",
           "run"]
