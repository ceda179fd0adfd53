"""A worst-case cost estimate of a device selector, to refuse what upstream refuses as too complex.

Upstream (``k8s.io/dynamic-resource-allocation/cel``) estimates every selector with cel-go's checker
(``env.EstimateCost``) against the declared maximum sizes of the ``device`` variable, and the API server
refuses an expression whose estimate exceeds ``CELSelectorExpressionMaxCost`` = 1,000,000 ("too complex,
exceeds cost limit"); at run time the same number caps the actual cost ("operation cancelled: actual cost
limit exceeded"). Partita has no cel-go checker, so this module approximates that estimate on the parsed
tree (:mod:`controller.allocator.celsyntax`) with the same structure, where all of the cost is:

* 1 per identifier, field selection, index, operator and function call; ``==`` with a string literal
  costs a tenth of its length and string-scanning functions (``matches``, ``find``, ``contains``,
  ``split``, ...) add the maximum string length / 10, as cel-go's string costs do; ``cel.bind`` adds 10
  (it is a one-step comprehension);
* a comprehension costs its range plus, per element of the range, its body plus 3 (cel-go's loop
  condition and step), so nesting multiplies by each range's maximum size;
* maximum sizes: a list literal has its length, ``device.attributes`` / ``device.capacity`` and each
  domain map in them hold at most 32 entries (``ResourceSliceMaxAttributesAndCapacitiesPerDevice``),
  ``lists.range(n)`` has n, ``map``/``filter`` keep their range's size, and anything else (a string, a
  split result, a nested list) is assumed to hold at most 64 (``DeviceAttributeMaxValueLength``).

The numbers are cel-go's for the flat selectors of upstream's compile_test.go (``device.attributes[d].name``
4, ``... > 0`` 5, ``device.capacity[d].name.isGreaterThan(quantity("1Ki"))`` 6, the ``in`` guard plus that
10, ``cel.bind`` 15; tests/test_cel.py checks them) and grow the same way for loops (upstream's seven nested
10-element loops: 85,555,551 there, about 1.3e8 here), so expressions far from the limit are treated
alike; near the limit the two estimates may disagree, and this one errs on the high side for unknown sizes.
"""

from __future__ import annotations

from .celsyntax import Node, macro_vars, qualified_call_name

MAX_COST = 1_000_000            # resourceapi.CELSelectorExpressionMaxCost
MAX_MAP_ENTRIES = 32            # ResourceSliceMaxAttributesAndCapacitiesPerDevice
MAX_STRING = 64                 # DeviceAttributeMaxValueLength
UNKNOWN_SIZE = 64
_SCANNING = {"matches", "find", "findAll", "contains", "startsWith", "endsWith", "split", "replace", "indexOf",
             "lastIndexOf", "lowerAscii", "upperAscii", "trim", "substring", "join", "format", "quote"}


def _is_device_map(n: Node) -> bool:
    """``device.attributes`` / ``device.capacity`` or one domain map in them."""
    if n.kind == "select" and n.value in ("attributes", "capacity") and n.target is not None and \
            n.target.kind == "ident" and n.target.value == "device":
        return True
    return n.kind == "index" and n.target is not None and _is_device_map_root(n.target)


def _is_device_map_root(n: Node) -> bool:
    return n.kind == "select" and n.value in ("attributes", "capacity") and n.target is not None and \
        n.target.kind == "ident" and n.target.value == "device"


def size(n: Node, sizes: dict[str, int]) -> int:
    """The maximum number of elements ``n`` can hold."""
    if n.kind == "list":
        return len(n.args)
    if n.kind == "map":
        return len(n.args) // 2
    if n.kind == "lit":
        return max(1, len(n.value))
    if _is_device_map(n):
        return MAX_MAP_ENTRIES
    if n.kind == "ident" and n.value in sizes:
        return sizes[n.value]
    if n.kind == "call":
        if qualified_call_name(n) == "lists.range" and n.args and n.args[0].kind == "lit" and \
                n.args[0].lit_type == "int":
            return max(0, int(n.args[0].value, 0))
        if n.target is not None and n.value in ("map", "filter", "transformList", "transformMap", "slice",
                                                "distinct", "sort", "reverse"):
            return size(n.target, sizes)
    return UNKNOWN_SIZE


def estimate(n: Node, sizes: dict[str, int] | None = None) -> int:  # noqa: C901 - one case per node kind
    sizes = sizes or {}
    k = n.kind
    if k == "lit":
        return 0
    if k == "ident":
        return 1
    if k == "select":
        return estimate(n.target, sizes) + 1  # type: ignore[arg-type]
    if k == "index":
        return estimate(n.target, sizes) + estimate(n.args[0], sizes) + 1  # type: ignore[arg-type]
    if k == "unary":
        return estimate(n.args[0], sizes) + 1
    if k == "binary":
        extra = size(n.args[1], sizes) if n.value == "in" and n.args[1].kind != "map" and \
            not _is_device_map(n.args[1]) else 1
        strings = [a for a in n.args if a.kind == "lit" and a.lit_type == "string"]
        if n.value in ("==", "!=") and strings:     # cel-go: 0.1 per character of the shorter string
            extra = -(-min(len(a.value) - 2 for a in strings) // 10)
        return estimate(n.args[0], sizes) + estimate(n.args[1], sizes) + (0 if n.value in ("&&", "||") else extra)
    if k == "cond":
        return estimate(n.args[0], sizes) + max(estimate(n.args[1], sizes), estimate(n.args[2], sizes))
    if k in ("list", "map"):
        return sum(estimate(a, sizes) for a in n.args) + 1
    vs = macro_vars(n)
    if vs is not None and qualified_call_name(n) == "cel.bind":
        init, body = n.args[1], n.args[2]
        inner = {**sizes, vs[0]: size(init, sizes)}
        return estimate(init, sizes) + estimate(body, inner) + 10   # a one-step comprehension in cel-go
    if vs is not None:
        rng = n.target  # type: ignore[assignment]
        count = size(rng, sizes)  # type: ignore[arg-type]
        inner = dict(sizes)
        for v in vs:
            inner[v] = UNKNOWN_SIZE
        if rng is not None and _is_device_map_root(rng):
            inner[vs[0]] = MAX_STRING       # iterating device.attributes gives domain names
        body = sum(estimate(a, inner) for a in n.args[len(vs):])
        return estimate(rng, sizes) + count * (body + 3)  # type: ignore[arg-type]
    cost = sum(estimate(a, sizes) for a in n.args) + 1
    if n.target is not None and qualified_call_name(n) is None:
        cost += estimate(n.target, sizes)
    if n.value in _SCANNING:
        cost += -(-MAX_STRING // 10)
    if n.value in ("sum", "min", "max", "isSorted", "distinct", "sort", "flatten", "indexOf", "lastIndexOf",
                   "contains", "equivalent", "intersects") and n.target is not None:
        cost += size(n.target, sizes) if n.value != "distinct" else size(n.target, sizes) ** 2
    return cost
