"""The allocator: upstream Kubernetes structured-allocation semantics for a set of claims on one node,
and a strategy-ordered search over candidate nodes.

Never raises anything but :class:`AllocationError` into its caller.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from typing import AbstractSet, Iterator, Mapping, Sequence

from .cel import Evaluator
from .pools import SliceIndex
from .search import Run, claim_ref
from .strategies import Strategy, get_strategy
from .types import AllocatedState, AllocationError, DeviceID, Features, Node, NodeChoice

#: what one call may not use besides what other claims hold: node names (str) and devices (DeviceID) —
#: capacity reserved for another claim, or GPUs serving another sharing strategy
Unavailable = AbstractSet["str | DeviceID"]
NOTHING: Unavailable = frozenset()

log = logging.getLogger(__name__)


class Allocator:
    def __init__(self, features: Features = Features(), strategy: str | Strategy = "first-fit", max_steps: int = 0):
        """``max_steps``: give up on a node after that many search steps (SearchLimitExceeded, node-local);
        0, the default, searches exhaustively as upstream does."""
        self.features = features
        self.max_steps = max_steps
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.evaluator = Evaluator()
        self.last_steps = 0
        self._misses: dict[tuple, str] = {}
        self._hints: dict[str, str] = {}

    def allocate(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
                 allocated: AllocatedState, unavailable: Unavailable = NOTHING) -> list[dict] | None:
        """AllocationResult per claim (in order), or None when the claims do not fit on ``node``.
        ``unavailable``: nodes and devices this call may not use (see :data:`Unavailable`); ``allocated``
        is the same after the call."""
        if node.name in unavailable:
            return None
        with _withheld(allocated, unavailable):
            return self._allocate(node, claims, slices, classes, allocated)

    def _allocate(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
                  allocated: AllocatedState) -> list[dict] | None:
        run = self._run(node, claims, slices, classes, allocated)
        ok = self._search(run)
        if not ok:
            if run.invalid_pools:
                raise AllocationError("invalid resource pools were encountered: " + "; ".join(
                    f"{p}: {p.invalid_reason}" for p in run.invalid_pools), node_local=True)
            return None
        return run.build()

    def _run(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
             allocated: AllocatedState) -> Run:
        try:
            pools = slices.pools_for_node(node, self.features.partitionable_devices)
            strategy = self.strategy
            run = Run(features=self.features, node=node, claims=claims, pools=pools, classes=classes,
                      allocated=allocated, evaluator=self.evaluator,
                      order=None if strategy.name == "first-fit" else
                      (lambda rd, cands: strategy.order_devices(rd, cands, allocated)))
            run.prepare()
            run.max_steps = self.max_steps
            return run
        except AllocationError:
            raise
        except Exception as e:  # noqa: BLE001 - bad input must never escape as anything else
            log.exception("allocator failed on its input")
            raise AllocationError(f"allocating {', '.join(claim_ref(c) for c in claims)}: {e}") from e

    def _search(self, run: Run) -> bool:
        try:
            ok = run.search()
        except AllocationError:
            raise
        except RecursionError:
            raise AllocationError("allocation search exceeded its depth limit") from None
        except Exception as e:  # noqa: BLE001
            log.exception("allocator search failed")
            raise AllocationError(f"allocation failed: {e}") from e
        finally:
            self.last_steps = run.steps
        return ok

    def allocate_on_nodes(self, nodes: Sequence[Node], claims: Sequence[Mapping], slices: SliceIndex,
                          classes: Mapping[str, Mapping], allocated: AllocatedState,
                          max_reasons: int = 8, unavailable: Unavailable = NOTHING) -> NodeChoice:
        """Try candidate nodes in the strategy's order; the first that fits wins. When none does, the
        reasons of up to ``max_reasons`` nodes say why. ``unavailable``: nodes and devices this call may
        not use (nodes named there are not tried); ``allocated`` is the same after the call."""
        if unavailable:
            nodes = [n for n in nodes if n.name not in unavailable]
            with _withheld(allocated, unavailable):
                return self._on_nodes(nodes, claims, slices, classes, allocated, max_reasons)
        return self._on_nodes(nodes, claims, slices, classes, allocated, max_reasons)

    def _on_nodes(self, nodes: Sequence[Node], claims: Sequence[Mapping], slices: SliceIndex,
                  classes: Mapping[str, Mapping], allocated: AllocatedState, max_reasons: int) -> NodeChoice:
        shape = _shape(claims, classes)
        failed: list[Node] = []
        reasons: dict[str, str] = {}
        for node in self._node_order(shape, nodes, slices, allocated):
            key = self._node_key(shape, node, slices, allocated)
            cached = self._misses.get(key)
            if cached is not None:
                reasons[node.name] = cached
                failed.append(node)
                continue
            try:
                results = self._allocate(node, claims, slices, classes, allocated)
            except AllocationError as e:
                if not e.node_local:
                    raise
                reasons[node.name] = str(e)
                failed.append(node)
                continue
            if results is not None:
                if getattr(self.strategy, "sticky", False):
                    self._hints[shape] = node.name
                return NodeChoice(node, results, {})
            self._remember_miss(key, "")
            failed.append(node)
        for node in failed[:max_reasons]:
            if not reasons.get(node.name):
                reasons[node.name] = self.why_not(node, claims, slices, classes, allocated)
                self._remember_miss(self._node_key(shape, node, slices, allocated), reasons[node.name])
        return NodeChoice(None, None, {n.name: reasons[n.name] for n in failed[:max_reasons] if reasons.get(n.name)})

    def _node_order(self, shape: str, nodes: Sequence[Node], slices: SliceIndex,
                    allocated: AllocatedState) -> Iterator[Node]:
        """The strategy's order; a sticky strategy (pack) first retries the node where the same kind of
        claim fitted last, which is where it packs — and spares ordering every node for every claim."""
        hint = self._hints.get(shape) if getattr(self.strategy, "sticky", False) else None
        if hint is not None:
            first = next((n for n in nodes if n.name == hint), None)
            if first is not None:
                yield first
        for node in self.strategy.order_nodes(nodes, slices, allocated):
            if node.name != hint:
                yield node

    def _node_key(self, shape: str, node: Node, slices: SliceIndex, allocated: AllocatedState) -> tuple:
        """Everything the outcome on a node depends on: the claims (by content), the node's slices and
        what other claims hold in the node's pools."""
        return (shape, node.name, tuple(sorted(node.labels.items())), slices.node_key(node.name),
                tuple((pid, allocated.pool_signature(*pid)) for pid in slices.node_pool_ids(node.name)))

    def _remember_miss(self, key: tuple, reason: str) -> None:
        if len(self._misses) > 100_000:
            self._misses.clear()
        self._misses[key] = reason

    def why_not(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
                allocated: AllocatedState) -> str:
        """A short reason the claims do not fit on the node (for events and logs)."""
        try:
            run = self._run(node, claims, slices, classes, allocated)
        except AllocationError as e:
            return str(e)
        pools = [p for p in run.pools if not (p.incomplete or p.invalid)]
        if not pools:
            return "no devices published for this node"
        parts = []
        for (ci, ri, si), rd in sorted(run.req.items()):
            if rd.parent is not None and si > 0:
                continue
            try:
                matching = [d for p in pools for d, failure in run.class_list(p, rd)
                            if failure is None and run.request_ok((ci, ri, si), rd, d)]
            except AllocationError as e:
                return str(e)
            free = [d for d in matching if d.id not in allocated.devices]
            cls = (rd.cls or {}).get("metadata", {}).get("name", "?")
            need = rd.num_devices if rd.mode == "ExactCount" else "all"
            parts.append(f"request {rd.full_name}: needs {need}, {len(matching)} device(s) match class {cls}"
                         f"{' and its selectors' if rd.spec.get('selectors') else ''}, {len(free)} not allocated")
        return "; ".join(parts) or "no solution"


@contextlib.contextmanager
def _withheld(allocated: AllocatedState, unavailable: Unavailable) -> Iterator[None]:
    """The unavailable devices count as held for the duration of one call (the pool signatures change with
    them, so the per-node caches stay right), and are given back after it."""
    added = [d for d in unavailable if isinstance(d, DeviceID) and d not in allocated.devices]
    for d in added:
        allocated.add_device(d)
    try:
        yield
    finally:
        for d in added:
            allocated.remove_device(d)


def _shape(claims: Sequence[Mapping], classes: Mapping[str, Mapping]) -> str:
    """The claims' requests and the classes they use, by content (names and UIDs left out)."""
    specs = [(c.get("spec") or {}).get("devices") or {} for c in claims]
    used = sorted({r.get("exactly", {}).get("deviceClassName", "") for d in specs for r in d.get("requests") or []}
                  | {s.get("deviceClassName", "") for d in specs for r in d.get("requests") or []
                     for s in r.get("firstAvailable") or []})
    return json.dumps([specs, [(n, (classes.get(n) or {}).get("spec")) for n in used]], sort_keys=True)


def copy_claim_with_tolerations(claim: Mapping, tolerations: Sequence[Mapping]) -> dict:
    """A copy of a claim whose every request (and subrequest) also tolerates ``tolerations``."""
    c = copy.deepcopy(dict(claim))
    for r in ((c.get("spec") or {}).get("devices") or {}).get("requests") or []:
        for spec in ([r["exactly"]] if "exactly" in r else []) + list(r.get("firstAvailable") or []):
            spec["tolerations"] = list(spec.get("tolerations") or []) + [dict(t) for t in tolerations]
    return c
