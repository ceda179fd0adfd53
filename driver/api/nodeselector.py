"""Whether a ``v1.NodeSelector`` selects a node, and if not, why (upstream nodeaffinity semantics).

Terms are ORed and the requirements of a term ANDed; a term without requirements matches nothing;
``matchExpressions`` test the node's labels (``In``, ``NotIn``, ``Exists``, ``DoesNotExist``, ``Gt``,
``Lt``), ``matchFields`` only ``metadata.name`` with ``In``/``NotIn`` and exactly one value. A malformed
requirement makes its term match nothing, as upstream's parse errors do. Plain data in, plain data
out: the kubelet plugin uses it to check that an allocation is for its node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

_LABEL_OPS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")


@dataclass(frozen=True)
class NodeFacts:
    """What a selector can test: the node's name and its labels (None when they could not be read)."""

    name: str
    labels: Mapping[str, str] | None = None


def _expression_fails(req: Mapping, labels: Mapping[str, str]) -> str | None:
    key, op, values = req.get("key") or "", req.get("operator"), list(req.get("values") or [])
    present, value = key in labels, labels.get(key)
    shown = f"label {key}={value!r}" if present else f"label {key} (absent)"
    if op not in _LABEL_OPS:
        return f"matchExpressions operator {op!r} for {key} is not one of {', '.join(_LABEL_OPS)}"
    if op in ("In", "NotIn") and not values:
        return f"matchExpressions {key} {op} has no values"
    if op in ("Exists", "DoesNotExist") and values:
        return f"matchExpressions {key} {op} must not have values"
    if op == "In":
        return None if present and value in values else f"{shown} is not In {values}"
    if op == "NotIn":
        return None if not present or value not in values else f"{shown} is In {values}"
    if op == "Exists":
        return None if present else f"{shown} does not exist"
    if op == "DoesNotExist":
        return None if not present else f"{shown} exists"
    if len(values) != 1:
        return f"matchExpressions {key} {op} needs exactly one integer value, got {values}"
    try:
        bound = int(values[0])
    except ValueError:
        return f"matchExpressions {key} {op} value {values[0]!r} is not an integer"
    try:
        number = int(value) if present else None
    except ValueError:
        number = None
    if number is None:
        return f"{shown} is not an integer"
    ok = number > bound if op == "Gt" else number < bound
    return None if ok else f"{shown} is not {'>' if op == 'Gt' else '<'} {bound}"


def _field_fails(req: Mapping, name: str) -> str | None:
    key, op, values = req.get("key"), req.get("operator"), list(req.get("values") or [])
    if key != "metadata.name":
        return f"matchFields key {key!r} is not supported (only metadata.name)"
    if op not in ("In", "NotIn") or len(values) != 1:
        return f"matchFields metadata.name needs operator In or NotIn with exactly one value, got {op} {values}"
    if op == "In":
        return None if name in values else f"metadata.name {name} is not In {values}"
    return None if name not in values else f"metadata.name {name} is In {values}"


def term_mismatch(term: Mapping, node: NodeFacts) -> str | None:
    """None when the term selects the node, else why not."""
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return "the term has no requirements (it matches no node)"
    for f in fields:
        why = _field_fails(f, node.name)
        if why:
            return why
    if exprs and node.labels is None:
        return "it tests node labels, which the plugin could not read from the API server (it retries)"
    for e in exprs:
        why = _expression_fails(e, node.labels or {})
        if why:
            return why
    return None


def selector_mismatch(selector: Mapping | None, node: NodeFacts) -> list[str] | None:
    """None when ``selector`` (unset: every node) selects the node, else one reason per term."""
    if not selector:
        return None
    if not isinstance(selector, Mapping):
        return [f"it is not an object ({selector!r})"]
    terms = selector.get("nodeSelectorTerms") or []
    if not isinstance(terms, list):
        return [f"nodeSelectorTerms is not a list ({terms!r})"]
    reasons = []
    for i, term in enumerate(terms):
        if not isinstance(term, Mapping) or not all(
                isinstance(r, Mapping) for k in ("matchExpressions", "matchFields") for r in term.get(k) or []):
            reasons.append(f"term {i}: malformed ({term!r})")
            continue
        why = term_mismatch(term, node)
        if why is None:
            return None
        reasons.append(f"term {i}: {why}")
    return reasons or ["it has no nodeSelectorTerms (it matches no node)"]


def selected_node_names(selector: Mapping | None) -> set[str] | None:
    """The node names a selector made only of ``matchFields metadata.name In [x]`` terms allows; None
    when it uses anything else."""
    if not selector or not isinstance(selector, Mapping):
        return None
    terms = selector.get("nodeSelectorTerms") or []
    if not terms or not isinstance(terms, list) or not all(isinstance(t, Mapping) for t in terms):
        return None
    names: set[str] = set()
    for term in terms:
        fields = term.get("matchFields") or []
        if term.get("matchExpressions") or len(fields) != 1 or not isinstance(fields[0], Mapping) \
                or fields[0].get("key") != "metadata.name" or fields[0].get("operator") != "In":
            return None
        names.update(fields[0].get("values") or [])
    return names
