"""The allocator: upstream Kubernetes structured-allocation semantics for a set of claims on one node,
and a strategy-ordered search over candidate nodes.

Never raises anything but :class:`AllocationError` into its caller.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
from typing import AbstractSet, Iterator, Mapping, Sequence

from driver.api import objects

from .cel import Evaluator
from .nodeindex import FullNodes
from .pools import SliceIndex
from .search import SELECTION, Run, claim_ref
from .strategies import Strategy, get_strategy
from .types import AllocatedState, AllocationError, DeviceID, Features, Node, NodeChoice

#: what one call may not use besides what other claims hold: node names (str) and devices (DeviceID) —
#: capacity reserved for another claim, or GPUs serving another sharing strategy
Unavailable = AbstractSet["str | DeviceID"]
NOTHING: Unavailable = frozenset()

log = logging.getLogger(__name__)


class Allocator:
    def __init__(self, features: Features = Features(), strategy: str | Strategy = "first-fit", max_steps: int = 0,
                 node_index: bool = True):
        """``max_steps``: give up on a node after that many search steps (SearchLimitExceeded, node-local);
        0, the default, searches exhaustively as upstream does. ``node_index``: skip the nodes known not to
        fit a claim's shape (:class:`FullNodes`); False tries every candidate every time (same results,
        slower: the reference the index is tested against)."""
        self.features = features
        self.node_index = node_index
        self.max_steps = max_steps
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.evaluator = Evaluator()
        self.last_steps = 0
        self._full = FullNodes()
        #: shape -> (node name, its position among the nodes last passed) where it fitted last (sticky strategies)
        self._hints: dict[str, tuple[str, int]] = {}

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
        run = self.trial(node, claims, slices, classes, allocated)
        ok = self._search(run)
        if not ok:
            if run.invalid_pools:
                raise AllocationError("invalid resource pools were encountered: " + "; ".join(
                    f"{p}: {p.invalid_reason}" for p in run.invalid_pools), node_local=True)
            return None
        return run.build()

    def trial(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
              allocated: AllocatedState) -> Run:
        """The prepared (validated, not yet searched) allocation run for ``claims`` on ``node``: its pools,
        its (sub)requests (``run.req``), their candidates (``run.class_list``), the one check per device
        (``run.exclusion``) and the claims' constraints — what :meth:`why_not` and ``partita explain``
        analyse. Raises :class:`AllocationError` for input the allocator refuses."""
        try:
            pools = slices.pools_for_node(node, self.features.partitionable_devices)
            strategy = self.strategy
            run = Run(features=self.features, node=node, claims=claims, pools=pools, classes=classes,
                      allocated=allocated, evaluator=self.evaluator,
                      order=(lambda rd, cands: strategy.order_devices(rd, cands, allocated))
                      if strategy.orders_devices else None)
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
        not use (nodes named there are not tried); ``allocated`` is the same after the call.

        Nodes known not to fit claims of this shape as things are (:class:`FullNodes`) are skipped without
        an allocation attempt; the strategy orders only the others."""
        if unavailable:
            nodes = [n for n in nodes if n.name not in unavailable]
            with _withheld(allocated, unavailable):
                return self._on_nodes(nodes, claims, slices, classes, allocated, max_reasons)
        return self._on_nodes(nodes, claims, slices, classes, allocated, max_reasons)

    def _on_nodes(self, nodes: Sequence[Node], claims: Sequence[Mapping], slices: SliceIndex,
                  classes: Mapping[str, Mapping], allocated: AllocatedState, max_reasons: int) -> NodeChoice:
        shape = _shape(claims, classes)
        full = self._full
        if not self.node_index:
            full.clear()
        full.sync(slices, allocated)
        entries = full.for_shape(shape)
        reasons: dict[str, str] = {}
        for node in self._node_order(shape, nodes, slices, allocated, entries):
            try:
                results = self._allocate(node, claims, slices, classes, allocated)
            except AllocationError as e:
                if not e.node_local:
                    raise
                reasons[node.name] = str(e)
                continue
            if results is not None:
                if self.strategy.sticky and self._hints.get(shape, ("",))[0] != node.name:
                    self._hints[shape] = (node.name, -1)     # its position is looked up when next used
                return NodeChoice(node, results, {})
            full.add(shape, node, slices)
        # None fits: every candidate failed, so the first ``max_reasons`` of the strategy's whole order are
        # the nodes to explain (those skipped as full included, with the reason remembered for them).
        failed = list(itertools.islice(self._node_order(shape, nodes, slices, allocated, None), max_reasons))
        for node in failed:
            if not reasons.get(node.name):
                reasons[node.name] = full.reason(entries, node) or ""
            if not reasons[node.name]:
                reasons[node.name] = self.why_not(node, claims, slices, classes, allocated)
                full.add(shape, node, slices, reasons[node.name])
        return NodeChoice(None, None, {n.name: reasons[n.name] for n in failed if reasons.get(n.name)})

    def _node_order(self, shape: str, nodes: Sequence[Node], slices: SliceIndex, allocated: AllocatedState,
                    full: dict | None) -> Iterator[Node]:
        """The strategy's order of the candidates not known to be full (all of them with ``full`` None); a
        sticky strategy (pack) first retries the node where the same kind of claim fitted last, which is
        where it packs — and spares ordering every node for every claim."""
        hint = self._hints.get(shape) if self.strategy.sticky else None
        name = None
        if hint is not None:
            name, position = hint
            if 0 <= position < len(nodes) and nodes[position].name == name:
                first: Node | None = nodes[position]
            else:
                position, first = next(((i, n) for i, n in enumerate(nodes) if n.name == name), (-1, None))
                self._hints[shape] = (name, position)
            if first is not None and (full is None or not FullNodes.is_full(full, first)):
                yield first
        if full:
            get = full.get
            rest: Sequence[Node] = [n for n in nodes if (e := get(n.name)) is None or not (e.node is n or e.node == n)]
        else:
            rest = nodes
        for node in self.strategy.order_nodes(rest, slices, allocated):
            if node.name != name:
                yield node

    def why_not(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
                allocated: AllocatedState) -> str:
        """A short reason the claims do not fit on the node (for events and logs)."""
        try:
            run = self.trial(node, claims, slices, classes, allocated)
        except AllocationError as e:
            return str(e)
        pools = [p for p in run.pools if not (p.incomplete or p.invalid)]
        if not pools:
            return "no devices published for this node"
        parts = []
        for key, rd in sorted(run.req.items()):
            if rd.parent is not None and key[2] > 0:
                continue
            matching = free = 0
            try:
                for p in pools:
                    for d, failure in run.class_list(p, rd):
                        if run.exclusion(key, rd, p, d, failure) in SELECTION:
                            continue
                        matching += 1
                        free += d.id not in allocated.devices
            except AllocationError as e:
                return str(e)
            cls = (rd.cls or {}).get("metadata", {}).get("name", "?")
            need = rd.num_devices if rd.mode == "ExactCount" else "all"
            parts.append(f"request {rd.full_name}: needs {need}, {matching} device(s) match class {cls}"
                         f"{' and its selectors' if rd.spec.get('selectors') else ''}, {free} not allocated")
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
    used = sorted({n for c in claims for n in objects.device_class_names(c)})
    return json.dumps([specs, [(n, (classes.get(n) or {}).get("spec")) for n in used]], sort_keys=True)


def copy_claim_with_tolerations(claim: Mapping, tolerations: Sequence[Mapping]) -> dict:
    """A copy of a claim whose every request (and subrequest) also tolerates ``tolerations``."""
    c = copy.deepcopy(dict(claim))
    for rs in objects.request_specs(c):
        if isinstance(rs.spec, dict):     # the copy's own dict (a malformed one reads as a fresh {})
            rs.spec["tolerations"] = list(rs.spec.get("tolerations") or []) + [dict(t) for t in tolerations]
    return c
