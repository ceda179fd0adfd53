"""The allocator: upstream Kubernetes structured-allocation semantics for a set of claims on one node,
and a strategy-ordered search over candidate nodes.

Never raises anything but :class:`AllocationError` into its caller.
"""

from __future__ import annotations

import copy
import logging
from typing import Mapping, Sequence

from .cel import Evaluator
from .pools import SliceIndex
from .search import Run, claim_ref
from .strategies import Strategy, get_strategy
from .types import AllocatedState, AllocationError, Features, Node, NodeChoice

log = logging.getLogger(__name__)


class Allocator:
    def __init__(self, features: Features = Features(), strategy: str | Strategy = "first-fit"):
        self.features = features
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.evaluator = Evaluator()
        self.last_steps = 0

    def allocate(self, node: Node, claims: Sequence[Mapping], slices: SliceIndex, classes: Mapping[str, Mapping],
                 allocated: AllocatedState) -> list[dict] | None:
        """AllocationResult per claim (in order), or None when the claims do not fit on ``node``."""
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
                          classes: Mapping[str, Mapping], allocated: AllocatedState) -> NodeChoice:
        """Try candidate nodes in the strategy's order; the first that fits wins."""
        reasons: dict[str, str] = {}
        node_local_errors: list[str] = []
        for node in self.strategy.order_nodes(nodes, slices, allocated):
            try:
                results = self.allocate(node, claims, slices, classes, allocated)
            except AllocationError as e:
                if not e.node_local:
                    raise
                reasons[node.name] = str(e)
                node_local_errors.append(str(e))
                continue
            if results is not None:
                return NodeChoice(node, results, reasons)
            reasons[node.name] = self.why_not(node, claims, slices, classes, allocated)
        return NodeChoice(None, None, reasons)

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
            cands = [d for p in pools for d in p.devices()]
            try:
                matching = [d for d in cands if run.selectable((ci, ri, si), rd, d)]
            except AllocationError as e:
                return str(e)
            free = [d for d in matching if d.id not in allocated.devices]
            cls = (rd.cls or {}).get("metadata", {}).get("name", "?")
            need = rd.num_devices if rd.mode == "ExactCount" else "all"
            parts.append(f"request {rd.full_name}: needs {need}, {len(matching)} device(s) match class {cls}"
                         f"{' and its selectors' if rd.spec.get('selectors') else ''}, {len(free)} not allocated")
        return "; ".join(parts) or "no solution"


def copy_claim_with_tolerations(claim: Mapping, tolerations: Sequence[Mapping]) -> dict:
    """A copy of a claim whose every request (and subrequest) also tolerates ``tolerations``."""
    c = copy.deepcopy(dict(claim))
    for r in ((c.get("spec") or {}).get("devices") or {}).get("requests") or []:
        for spec in ([r["exactly"]] if "exactly" in r else []) + list(r.get("firstAvailable") or []):
            spec["tolerations"] = list(spec.get("tolerations") or []) + [dict(t) for t in tolerations]
    return c
