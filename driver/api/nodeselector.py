"""Whether a ``v1.NodeSelector`` selects a node, and if not, why: the one home of node selector matching, with
the semantics of upstream's ``k8s.io/component-helpers/scheduling/corev1/nodeaffinity``.

Terms are ORed and the requirements of a term ANDed; a term without requirements matches nothing.
``matchExpressions`` test the node's labels: ``In``/``NotIn`` need at least one value (each a valid label
value), ``Exists``/``DoesNotExist`` none, ``Gt``/``Lt`` exactly one integer (a label that is absent or not an
integer never matches them); the key must be a valid label key. ``matchFields`` test the node's fields, of
which a node has only ``metadata.name``: ``In``/``NotIn`` with exactly one value (a field the node does not have
reads as empty, as upstream's ``fields.Set`` does). A requirement that breaks these rules is a *parse error* of
its term, and upstream has two ways to treat them, both here:

* :func:`node_matches` is ``NewNodeSelector(...).Match``: any parse error raises :class:`NodeSelectorError`
  (the structured allocator does this with the node selectors of slices, devices and allocations);
* :func:`node_matches_lazily` is ``NewLazyErrorNodeSelector(...).Match``: a malformed term matches nothing and
  the others still decide (kube-scheduler's NodeAffinity filter on a pod's required node affinity);
* :func:`selector_mismatch` is the lazy form with the reason per term (the kubelet plugin checking that an
  allocation is for its node).

Plain data in, plain data out; the node is anything with ``name`` and ``labels`` (``labels`` None: they could
not be read, so label requirements cannot be judged).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from driver.api.naming import is_label_value, is_qualified_name
from driver.errors import PartitaError

_LABEL_OPS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
_FIELD_OPS = ("In", "NotIn")
_INT = re.compile(r"^[+-]?[0-9]+$")
_INT64 = (-(2**63), 2**63 - 1)


def _is_map(v: object) -> bool:
    return type(v) is dict or isinstance(v, Mapping)       # dict first: the ABC check costs a call


class NodeSelectorError(PartitaError, ValueError):
    """A node selector upstream cannot parse; the message names the term, the requirement and the rule."""


@dataclass(frozen=True)
class NodeFacts:
    """What a selector can test: the node's name and its labels (None when they could not be read)."""

    name: str
    labels: Mapping[str, str] | None = None


class _Node(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str] | None: ...


# --- parsing (labels.NewRequirement, nodeSelectorRequirementsAs{Selector,FieldSelector}) ---------------------

def _label_key_error(key: object) -> str | None:
    if is_qualified_name(key):
        return None
    return (f"key {key!r} is not a label key (at most 63 letters, digits, '-', '_' or '.', starting and ending with a "
            "letter or digit, after an optional DNS subdomain prefix and '/')")


def _int64(value: object) -> int | None:
    if not isinstance(value, str) or not _INT.match(value):
        return None
    n = int(value)
    return n if _INT64[0] <= n <= _INT64[1] else None


def requirement_error(req: object, *, field: bool) -> str | None:
    """Why upstream cannot parse a requirement of ``matchFields`` (``field``) or ``matchExpressions``; None
    when it can."""
    if not _is_map(req):
        return f"requirement {req!r} is not an object"
    key, op, values = req.get("key"), req.get("operator"), req.get("values") or []
    if type(values) is not list or not all(type(v) is str for v in values):
        return f"{key} {op}: values must be a list of strings, got {values!r}"
    if not (key is None or type(key) is str) or not (op is None or type(op) is str):
        return f"requirement {dict(req)!r}: key and operator must be strings"
    return _parsed_error(key, op, tuple(values), field)


@functools.lru_cache(maxsize=4096)
def _parsed_error(key: str | None, op: str | None, values: tuple[str, ...], field: bool) -> str | None:
    """:func:`requirement_error` of a requirement's parts (cached: the allocator asks for the same selectors
    for every node and device)."""
    if field:
        if op not in _FIELD_OPS:
            return f"matchFields operator {op!r} for {key} is not one of {', '.join(_FIELD_OPS)}"
        if len(values) != 1:
            return f"matchFields {key} {op} needs exactly one value, got {values}"
        return None
    if op not in _LABEL_OPS:
        return f"matchExpressions operator {op!r} for {key} is not one of {', '.join(_LABEL_OPS)}"
    why = _label_key_error(key)
    if why:
        return f"matchExpressions {why}"
    if op in ("In", "NotIn"):
        if not values:
            return f"matchExpressions {key} {op} has no values"
        bad = [v for v in values if not is_label_value(v)]
        if bad:
            return f"matchExpressions {key} {op}: {bad[0]!r} is not a valid label value"
    elif op in ("Exists", "DoesNotExist"):
        if values:
            return f"matchExpressions {key} {op} must not have values"
    elif len(values) != 1:
        return f"matchExpressions {key} {op} needs exactly one integer value, got {values}"
    elif _int64(values[0]) is None:
        return f"matchExpressions {key} {op} value {values[0]!r} is not an integer"
    return None


def term_errors(term: object) -> list[str]:
    """The parse errors of a term (empty when upstream parses it)."""
    if not _is_map(term):
        return [f"malformed ({term!r})"]
    out: list[str] = []
    for k, is_field in (("matchExpressions", False), ("matchFields", True)):
        reqs = term.get(k)
        if not reqs:
            continue
        if type(reqs) is not list:
            out.append(f"{k} is not a list ({reqs!r})")
            continue
        for r in reqs:
            why = requirement_error(r, field=is_field)
            if why:
                out.append(why)
    return out


def _is_empty(term: Mapping) -> bool:
    return not term.get("matchExpressions") and not term.get("matchFields")


# --- matching (labels.Requirement.Matches, fields.OneTerm{,Not}EqualSelector) -------------------------------

def _expression_fails(req: Mapping, labels: Mapping[str, str]) -> str | None:
    key, op, values = req["key"], req["operator"], list(req.get("values") or [])
    present, value = key in labels, labels.get(key)
    shown = f"label {key}={value!r}" if present else f"label {key} (absent)"
    if op == "In":
        return None if present and value in values else f"{shown} is not In {values}"
    if op == "NotIn":
        return None if not present or value not in values else f"{shown} is In {values}"
    if op == "Exists":
        return None if present else f"{shown} does not exist"
    if op == "DoesNotExist":
        return None if not present else f"{shown} exists"
    bound = int(values[0])
    number = _int64(value) if present else None
    if number is None:
        return f"{shown} is not an integer"
    ok = number > bound if op == "Gt" else number < bound
    return None if ok else f"{shown} is not {'>' if op == 'Gt' else '<'} {bound}"


def _field_fails(req: Mapping, name: str) -> str | None:
    key, op, value = req.get("key"), req["operator"], req["values"][0]
    if key != "metadata.name":       # a node has no other field: it reads as empty, as in upstream's fields.Set
        shown = f"{key} is not supported (a node has only metadata.name) and reads as empty, which"
        actual = ""
    else:
        shown, actual = f"metadata.name {name}", name
    if op == "In":
        return None if actual == value else f"{shown} is not In [{value!r}]"
    return None if actual != value else f"{shown} is In [{value!r}]"


def term_mismatch(term: Mapping, node: _Node) -> str | None:
    """None when the term selects the node, else why not (a parse error included)."""
    if not isinstance(term, Mapping):
        return f"malformed ({term!r})"
    if _is_empty(term):
        return "the term has no requirements (it matches no node)"
    errors = term_errors(term)
    if errors:
        return "; ".join(errors)
    return _term_fails(term, node)


def _term_fails(term: Mapping, node: _Node) -> str | None:
    """Why a term that parses does not select the node; None when it does."""
    if node.name:            # upstream tests fields only of a node with a name
        for f in term.get("matchFields") or []:
            why = _field_fails(f, node.name)
            if why:
                return why
    exprs = term.get("matchExpressions") or []
    if exprs and node.labels is None:
        return "it tests node labels, which the plugin could not read from the API server (it retries)"
    for e in exprs:
        why = _expression_fails(e, node.labels or {})
        if why:
            return why
    return None


def _terms(selector: object) -> list:
    if not _is_map(selector):
        raise NodeSelectorError(f"node selector {selector!r} is not an object")
    terms = selector.get("nodeSelectorTerms") or []   # type: ignore[attr-defined]
    if type(terms) is not list:
        raise NodeSelectorError(f"nodeSelectorTerms is not a list ({terms!r})")
    return terms


def node_matches(node: _Node, selector: Mapping) -> bool:
    """``NewNodeSelector(selector).Match(node)``: whether some term selects the node; a term upstream cannot
    parse raises :class:`NodeSelectorError` (whatever the other terms say)."""
    matched, errors = False, []
    for i, t in enumerate(_terms(selector)):
        if _is_map(t) and _is_empty(t):
            continue
        why = term_errors(t)
        if why:
            errors += [f"nodeSelectorTerms[{i}]: {w}" for w in why]
        elif not matched:
            matched = _term_fails(t, node) is None
    if errors:
        raise NodeSelectorError("; ".join(errors))
    return matched


def node_matches_lazily(node: _Node, selector: Mapping) -> bool:
    """``NewLazyErrorNodeSelector(selector).Match(node)``: whether some term selects the node; a term upstream
    cannot parse matches nothing."""
    try:
        terms = _terms(selector)
    except NodeSelectorError:
        return False
    return any(term_mismatch(t, node) is None for t in terms)


def selector_mismatch(selector: Mapping | None, node: _Node) -> list[str] | None:
    """None when ``selector`` (unset: every node) selects the node, else one reason per term (lazily: a
    malformed term is a reason, the others still decide)."""
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
                isinstance(r, Mapping) for k in ("matchExpressions", "matchFields") for r in _list(term.get(k))):
            reasons.append(f"term {i}: malformed ({term!r})")
            continue
        why = term_mismatch(term, node)
        if why is None:
            return None
        reasons.append(f"term {i}: {why}")
    return reasons or ["it has no nodeSelectorTerms (it matches no node)"]


def _list(v: object) -> list:
    return v if isinstance(v, list) else ([] if v is None else [v])


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
