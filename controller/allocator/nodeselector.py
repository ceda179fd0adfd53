"""Node selector matching with Kubernetes nodeaffinity semantics (terms ORed, requirements ANDed,
an empty term matches nothing; matchFields supports metadata.name)."""

from __future__ import annotations

from typing import Mapping

from driver.errors import PartitaError

from .types import Node


class NodeSelectorError(PartitaError, ValueError):
    pass


def _requirement(value: str | None, present: bool, req: Mapping) -> bool:
    op = req.get("operator")
    values = list(req.get("values") or [])
    if op == "In":
        return present and value in values
    if op == "NotIn":
        return not present or value not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        if not present or len(values) != 1:
            return False
        try:
            left, right = int(value), int(values[0])  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return left > right if op == "Gt" else left < right
    raise NodeSelectorError(f"unknown node selector operator {op!r}")


def term_matches(node: Node, term: Mapping) -> bool:
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False
    for r in exprs:
        key = r.get("key", "")
        if not _requirement(node.labels.get(key), key in node.labels, r):
            return False
    for r in fields:
        if r.get("key") != "metadata.name":
            raise NodeSelectorError(f"unsupported node selector field {r.get('key')!r}")
        if not _requirement(node.name, True, r):
            return False
    return True


def node_matches(node: Node, selector: Mapping) -> bool:
    return any(term_matches(node, t) for t in selector.get("nodeSelectorTerms") or [])
