"""Device selectors in CEL, as kube-scheduler's DRA allocator evaluates them, on ``common-expression-language``.

The ``device`` variable has ``driver``, ``attributes`` and ``capacity`` (maps from domain to maps from
identifier to value; unqualified names belong to the driver's domain) and ``allowMultipleAllocations``.

The environment is upstream's (``k8s.io/dynamic-resource-allocation/cel/compile.go`` at the conformance
fixtures' commit): the Kubernetes base environment plus ``cel.bind``. On top of the CEL standard library:

* optional types: ``x.?f``, ``m[?k]``, ``[?e]``, ``{?k: v}``, ``optional.of/none/ofNonZeroValue``,
  ``hasValue``, ``value``, ``orValue``, ``or`` (the library has the type and functions; its parser lacks the
  syntax, which :mod:`celsyntax` lowers from a real parse of the expression, never by text patterns);
* ``cel.bind`` and the two-variable comprehensions (``all/exists/existsOne(i, v, p)``, ``transformList``,
  ``transformMap``), lowered the same way;
* ``quantity(s)``, ``isQuantity(s)`` and the Quantity members ``compareTo``, ``isGreaterThan``,
  ``isLessThan``, ``add``, ``sub``, ``asInteger``, ``asApproximateFloat``, ``isInteger``, ``sign``;
* ``semver(s[, normalize])``, ``isSemver(s[, normalize])`` and the members ``major``, ``minor``,
  ``patch``, ``compareTo``, ``isGreaterThan``, ``isLessThan`` (version attributes are Semver values);
* ext.Strings v2 ``lowerAscii``, ``upperAscii``, ``trim``, ``replace``, ``split``, ``join``, ``indexOf``,
  ``lastIndexOf``, ``substring``, ``charAt``, ``strings.quote``, ``format`` (no string ``reverse``: v3);
  regex ``find``, ``findAll``; library.Lists ``sum``, ``min``, ``max``, ``isSorted``, ``indexOf``,
  ``lastIndexOf``; ext.Lists v3, ext.Sets, URL, IP, CIDR and library.Format (:mod:`cellib`).
  ``math.*`` is not enabled upstream and is an undeclared reference here too.

Errors come in upstream's two classes: :class:`CelCompileError` (syntax, undeclared references, macro
misuse: what the API server refuses at create) and :class:`CelRuntimeError` (a missing key, a wrong type:
what the allocator reports for a device). :func:`validate_selector` adds the API server's cost check:
the worst-case estimate of :mod:`celcost` (how it approximates cel-go is documented there) against
upstream's limit of 1,000,000 (:class:`CelCostError`, "too complex, exceeds cost limit"); the evaluator
refuses such an expression at run time with upstream's "operation cancelled: actual cost limit exceeded".

Quantities, versions, URLs, IPs and CIDRs are passed through the library as tagged maps (it cannot
hold opaque Python values), so ``==`` between two quantities compares values exactly.

Known differences from the Go implementation (documented, checked by tests):

* No type checker: a type error (``device.driver + 1``) is a runtime error, not a compile error.
* A missing domain reads as an empty map (as upstream) because every domain an expression names in
  ``device.attributes[...]`` / ``device.capacity[...]`` (a string literal, or ``device.driver``) is added as
  an empty map when the device lacks it — unless the expression also tests it with ``'<domain>' in device.attributes``, in which case it is
  left absent so that test stays false.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from fractions import Fraction
from typing import Any, Callable, Mapping

import cel as _cel

from driver.api.quantity import Quantity, QuantityError
from driver.errors import PartitaError

from .celcost import MAX_COST, estimate
from .cellib import FUNCTIONS as LIB_FUNCTIONS, LibError
from .celsyntax import CelSyntaxError, Node, lower, macro_vars, parse, qualified_call_name, walk

MAX_EXPRESSION_LENGTH = 10 * 1024          # resourceapi.CELSelectorExpressionMaxLength
_Q = "__quantity__"
_V = "__semver__"


class CelError(PartitaError):
    """A selector could not be compiled or evaluated; ``str()`` is the upstream-style detail."""


class CelCompileError(CelError):
    pass


class CelCostError(CelCompileError):
    """The API server's refusal of an expression whose worst-case cost exceeds the limit (a Forbidden
    field error upstream, not Invalid)."""


class CelRuntimeError(CelError):
    pass


# -- tagged values ----------------------------------------------------------------------------------
def q_value(q: Quantity) -> dict:
    """Only the exact value, so ``==`` compares quantities by value as Kubernetes does."""
    return {_Q: str(q.value)}


def _q(v: Any) -> Quantity:
    if isinstance(v, dict) and _Q in v:
        return Quantity(Fraction(v[_Q]))
    if isinstance(v, bool) or not isinstance(v, int):
        raise CelRuntimeError(f"expected a quantity, got {_type_name(v)}")
    return Quantity(Fraction(v))


_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?$")


@lru_cache(maxsize=4096)
def _parse_semver_cached(text: str, normalize: bool) -> tuple:
    v = _parse_semver(text, normalize)
    return tuple(v[_V]), v["pre"]


def parse_semver(text: str, normalize: bool = False) -> dict:
    core, pre = _parse_semver_cached(text, normalize)
    return {_V: list(core), "pre": pre}


def _parse_semver(text: str, normalize: bool = False) -> dict:
    s = text
    if normalize:  # strip a "v", fill in missing minor/patch, drop leading zeros
        m = re.match(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(.*)$", s.strip())
        if m:
            s = f"{int(m.group(1))}.{int(m.group(2) or 0)}.{int(m.group(3) or 0)}{m.group(4)}"
    m = _SEMVER.match(s)
    if not m:
        raise CelRuntimeError(f"could not parse {text!r} as semver")
    return {_V: [int(m.group(1)), int(m.group(2)), int(m.group(3))], "pre": m.group(4) or ""}


def _v(v: Any) -> dict:
    if isinstance(v, dict) and _V in v:
        return v
    raise CelRuntimeError(f"expected a semver value, got {_type_name(v)}")


def _semver_cmp(a: dict, b: dict) -> int:
    x, y = tuple(a[_V]), tuple(b[_V])
    if x != y:
        return (x > y) - (x < y)
    pa, pb = a.get("pre", ""), b.get("pre", "")
    if pa == pb:
        return 0
    if not pa:
        return 1
    if not pb:
        return -1
    for ia, ib in zip(pa.split("."), pb.split(".")):
        if ia == ib:
            continue
        if ia.isdigit() and ib.isdigit():
            return (int(ia) > int(ib)) - (int(ia) < int(ib))
        if ia.isdigit() != ib.isdigit():
            return -1 if ia.isdigit() else 1
        return (ia > ib) - (ia < ib)
    return (len(pa.split(".")) > len(pb.split("."))) - (len(pa.split(".")) < len(pb.split(".")))


def _type_name(v: Any) -> str:
    if isinstance(v, dict) and _Q in v:
        return "Quantity"
    if isinstance(v, dict) and _V in v:
        return "Semver"
    return type(v).__name__


# -- functions --------------------------------------------------------------------------------------
def _quantity(s: Any) -> dict:
    if not isinstance(s, str):
        raise CelRuntimeError(f"quantity() takes a string, got {_type_name(s)}")
    try:
        return q_value(Quantity.parse(s))
    except QuantityError as e:
        raise CelRuntimeError(str(e)) from None


def _is_quantity(s: Any) -> bool:
    try:
        Quantity.parse(s)
        return True
    except (QuantityError, TypeError):
        return False


def _compare(a: Any, b: Any) -> int:
    if isinstance(a, dict) and _V in a:
        return _semver_cmp(a, _v(b))
    return _q(a).cmp(_q(b))


def _as_integer(a: Any) -> int:
    q = _q(a)
    if not q.is_integer() or not -(2**63) <= q.value < 2**63:
        raise CelRuntimeError("cannot convert value to integer: it is fractional or overflows int64")
    return int(q.value)


def _index_of(a: Any, b: Any, *start: int) -> int:
    if isinstance(a, str):
        return a.find(b, *start) if start else a.find(b)
    if isinstance(a, list):
        return a.index(b) if b in a else -1
    raise CelRuntimeError(f"indexOf() on {_type_name(a)}")


def _last_index_of(a: Any, b: Any) -> int:
    if isinstance(a, str):
        return a.rfind(b)
    if isinstance(a, list):
        return len(a) - 1 - a[::-1].index(b) if b in a else -1
    raise CelRuntimeError(f"lastIndexOf() on {_type_name(a)}")


def _semver_fn(s: Any, normalize: bool = False) -> dict:
    if not isinstance(s, str):
        raise CelRuntimeError(f"semver() takes a string, got {_type_name(s)}")
    return parse_semver(s, bool(normalize))


def _is_semver(s: Any, normalize: bool = False) -> bool:
    try:
        parse_semver(s, bool(normalize))
        return True
    except (CelRuntimeError, AttributeError, TypeError):
        return False


def _replace(s: str, old: str, new: str, n: int = -1) -> str:
    return s.replace(old, new, n if n >= 0 else -1)


def _split(s: str, sep: str, n: int = -1) -> list[str]:
    if n == 0:
        return []
    return s.split(sep, n - 1) if n > 0 else s.split(sep)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "quantity": _quantity,
    "isQuantity": _is_quantity,
    "compareTo": _compare,
    "isGreaterThan": lambda a, b: _compare(a, b) > 0,
    "isLessThan": lambda a, b: _compare(a, b) < 0,
    "add": lambda a, b: q_value(_q(a) + _q(b)),
    "sub": lambda a, b: q_value(_q(a) - _q(b)),
    "asInteger": _as_integer,
    "asApproximateFloat": lambda a: _q(a).as_float(),
    "isInteger": lambda a: _q(a).is_integer(),
    "sign": lambda a: _q(a).sign(),
    "semver": _semver_fn,
    "isSemver": _is_semver,
    "major": lambda v: _v(v)[_V][0],
    "minor": lambda v: _v(v)[_V][1],
    "patch": lambda v: _v(v)[_V][2],
    "lowerAscii": lambda s: "".join(c.lower() if c.isascii() else c for c in s),
    "upperAscii": lambda s: "".join(c.upper() if c.isascii() else c for c in s),
    "trim": lambda s: s.strip(),
    "replace": _replace,
    "split": _split,
    "join": lambda lst, sep="": sep.join(lst),
    "indexOf": _index_of,
    "lastIndexOf": _last_index_of,
    "substring": lambda s, a, b=None: s[a:b] if b is not None else s[a:],
    "charAt": lambda s, i: s[i] if i < len(s) else "",
    "find": lambda s, pat: (m.group(0) if (m := re.search(pat, s)) else ""),
    "findAll": lambda s, pat, n=-1: [m.group(0) for m in re.finditer(pat, s)][: (n if n >= 0 else None)],
    "sum": lambda lst: sum(lst),
    "min": lambda lst: min(lst),
    "max": lambda lst: max(lst),
    "isSorted": lambda lst: all(lst[i] <= lst[i + 1] for i in range(len(lst) - 1)),
}
_BUILTINS = {"size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string", "bool",
             "bytes", "type", "duration", "timestamp", "dyn", "getFullYear", "getMonth", "getDate",
             "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours", "getMinutes", "getSeconds",
             "getMilliseconds", "optional.of", "optional.none", "optional.ofNonZeroValue", "hasValue", "value",
             "orValue", "or"}
_MACROS = {"has", "all", "exists", "exists_one", "existsOne", "map", "filter", "transformList", "transformMap",
           "transformMapEntry", "sortBy", "cel.bind"}


def _check(node: Node, scope: frozenset[str]) -> None:
    """Undeclared references and macro misuse, as cel-go's parser and checker report them."""
    vs = macro_vars(node)
    qualified = qualified_call_name(node)
    if node.kind == "ident":
        if node.value not in scope and node.value != "device":
            raise CelCompileError(f"undeclared reference to '{node.value}' (the only variable is 'device')")
        return
    if node.kind == "call":
        name = qualified or node.value
        if name == "has":
            if len(node.args) != 1 or node.args[0].kind != "select" or node.target is not None:
                raise CelCompileError("invalid argument to has() macro")
        elif name in _MACROS and vs is None and name != "has":
            raise CelCompileError(f"invalid arguments to the {name}() macro: the first argument must be an "
                                  "identifier (the iteration variable)")
        elif name not in _MACROS and name not in FUNCTIONS and name not in LIB_FUNCTIONS and name not in _BUILTINS:
            raise CelCompileError(f"undeclared reference to '{name}'")
        if vs is not None:
            if qualified == "cel.bind":
                _check(node.args[1], scope)
                _check(node.args[2], scope | {vs[0]})
                return
            _check(node.target, scope)  # type: ignore[arg-type]
            for a in node.args[len(vs):]:
                _check(a, scope | set(vs))
            return
        if node.target is not None and qualified is None:
            _check(node.target, scope)
        for a in node.args:
            _check(a, scope)
        return
    _check_operands(node, scope)
    if node.target is not None:
        _check(node.target, scope)
    for a in node.args:
        _check(a, scope)


_NUMERIC = {"int", "uint", "double"}
_RETURNS = {"quantity": "Quantity", "semver": "Semver", "size": "int", "string": "string", "int": "int",
            "uint": "uint", "double": "double", "bool": "bool", "isQuantity": "bool", "isSemver": "bool",
            "lowerAscii": "string", "upperAscii": "string", "trim": "string", "matches": "bool",
            "startsWith": "bool", "endsWith": "bool", "compareTo": "int", "isGreaterThan": "bool",
            "isLessThan": "bool", "asInteger": "int", "asApproximateFloat": "double", "major": "int",
            "minor": "int", "patch": "int"}


def _static_type(node: Node, scope: frozenset[str]) -> str | None:
    """The type cel-go's checker gives ``node`` where it is certain (None: dyn, as attribute values)."""
    if node.kind == "lit":
        return {"string": "string", "bytes": "bytes", "int": "int", "uint": "uint", "double": "double",
                "bool": "bool", "null": "null_type"}[node.lit_type]
    if node.kind == "list":
        return "list" if not any(node.flags) else None
    if node.kind == "map":
        return "map" if not any(node.flags) else None
    if node.kind == "select" and not node.optional and node.target is not None and \
            node.target.kind == "ident" and node.target.value == "device" and "device" not in scope:
        return {"driver": "string", "allowMultipleAllocations": "bool"}.get(node.value)
    if node.kind == "select" and not node.optional and node.target is not None and \
            node.target.kind == "index" and _device_map(node.target.target) == "capacity":
        return "Quantity"
    if node.kind == "unary":
        return "bool" if node.value == "!" else _static_type(node.args[0], scope)
    if node.kind == "binary" and node.value in ("&&", "||", "==", "!=", "<", "<=", ">", ">=", "in"):
        return "bool"
    if node.kind == "call" and qualified_call_name(node) is None and macro_vars(node) is None:
        return _RETURNS.get(node.value)
    return None


def _check_operands(node: Node, scope: frozenset[str]) -> None:
    """cel-go refuses at compile time an operator no overload accepts: ``==`` between two known, different
    types (``device.driver == 1``), an ordering between types that are not both numeric or both the same
    ordered type, and ordering operators on Quantity/Semver (they have compareTo/isGreaterThan instead)."""
    if node.kind != "binary" or node.value in ("&&", "||", "in"):
        return
    a, b = (_static_type(x, scope) for x in node.args)
    if a is None or b is None:
        return
    op = f"_{node.value}_"
    ordering = node.value in ("<", "<=", ">", ">=")
    bad = (a != b and not (a in _NUMERIC and b in _NUMERIC and ordering)) or \
        (ordering and a in ("Quantity", "Semver", "list", "map", "null_type"))
    if node.value in ("+", "-", "*", "/", "%"):
        bad = a != b or a in ("bool", "null_type", "Quantity", "Semver", "map") or \
            (node.value != "+" and a in ("string", "bytes", "list"))
    if bad:
        raise CelCompileError(f"found no matching overload for '{op}' applied to '({a}, {b})'")


def _device_map(node: Node | None) -> str | None:
    """``attributes``/``capacity`` when ``node`` is ``device.attributes``/``device.capacity``."""
    if node is not None and node.kind == "select" and node.value in ("attributes", "capacity") and \
            node.target is not None and node.target.kind == "ident" and node.target.value == "device":
        return node.value
    return None


#: stands for "the device's own driver" in CompiledSelector.defaults: ``device.attributes[device.driver]``
_DRIVER_DOMAIN = "\x00driver"


def _domain_key(node: Node) -> str | None:
    """The domain a map index names: a string literal, or ``device.driver`` (as :data:`_DRIVER_DOMAIN`)."""
    if node.kind == "select" and node.value == "driver" and not node.optional and node.target is not None \
            and node.target.kind == "ident" and node.target.value == "device":
        return _DRIVER_DOMAIN
    return _string_lit(node)


def _string_lit(node: Node) -> str | None:
    if node.kind == "lit" and node.lit_type == "string":
        try:
            return str(_cel.evaluate(node.value))
        except Exception:  # noqa: BLE001 - the library parses the literal; nothing else can fail here
            return None
    return None


def _reads(tree: Node) -> tuple[set[tuple[str, str]], set[tuple[str, str]], frozenset | None]:
    """(indexed domains, domains tested with ``in``, the entries read or None when it may read more)."""
    parents: dict[int, Node] = {}
    for n in walk(tree):
        for c in ([n.target] if n.target is not None else []) + n.args:
            parents[id(c)] = n
    indexed: set[tuple[str, str]] = set()
    tested: set[tuple[str, str]] = set()
    needs: set[tuple[str, str, str]] = set()
    exact = True
    for n in walk(tree):
        if n.kind == "ident" and n.value == "device":
            p = parents.get(id(n))
            if p is None or p.kind != "select" or p.optional:
                exact = False
            continue
        which = _device_map(n)
        if which is None:
            continue
        p = parents.get(id(n))
        if p is not None and p.kind == "index" and p.target is n and \
                (domain := _domain_key(p.args[0])) is not None:
            indexed.add((which, domain))
            if domain == _DRIVER_DOMAIN:
                exact = False          # which entries it reads depends on the device's driver
            g = parents.get(id(p))
            if g is not None and g.kind == "select" and g.target is p:
                needs.add((which, domain, g.value))
            elif g is not None and g.kind == "index" and g.target is p and (key := _string_lit(g.args[0])):
                needs.add((which, domain, key))
            elif g is not None and g.kind == "binary" and g.value == "in" and g.args[1] is p and \
                    (key := _string_lit(g.args[0])):
                needs.add((which, domain, key))
            else:
                exact = False
        elif p is not None and p.kind == "binary" and p.value == "in" and p.args[1] is n and \
                (domain := _domain_key(p.args[0])) is not None:
            tested.add((which, domain))
            needs.add((which, domain, ""))
        else:
            exact = False
    return indexed, tested, (frozenset(needs) if exact else None)


@dataclass(frozen=True)
class CompiledSelector:
    expression: str
    program: Any
    #: domains the expression indexes: (map name, domain) pairs to default to {} when missing
    defaults: tuple[tuple[str, str], ...]
    #: (map, domain, name) entries the expression can read, or None when it may read anything (e.g. it
    #: iterates a map): lets the evaluator pass only those and memoize results by their values
    needs: frozenset[tuple[str, str, str]] | None = None
    #: the worst-case cost estimate (controller.allocator.celcost), compared with MAX_COST
    max_cost: int = 0
    #: what the library runs (optional syntax, cel.bind and two-variable comprehensions lowered)
    lowered: str = ""

    def wanted(self, which: str) -> tuple[frozenset[str], frozenset[str]]:
        """(fully qualified names, whole domains) of ``which`` (attributes/capacity) the expression reads."""
        names = frozenset(f"{d}/{n}" for w, d, n in self.needs or () if w == which and n)
        domains = frozenset(d for w, d, n in self.needs or () if w == which and not n)
        return names, domains


def compile_selector(expression: str) -> CompiledSelector:
    """Compile as upstream's CompileCELExpression does: syntax, references and macros are compile errors;
    the cost estimate is recorded (the API server refuses it, see :func:`validate_selector`)."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CelCompileError(f"expression is {len(expression)} characters long, more than the limit of "
                              f"{MAX_EXPRESSION_LENGTH}")
    try:
        tree = parse(expression)
    except CelSyntaxError as e:
        raise CelCompileError(f"compilation failed: {e}") from None
    _check(tree, frozenset())
    shape = {"list": "list(dyn)", "map": "map(dyn, dyn)"}.get(tree.kind) or \
        (tree.lit_type if tree.kind == "lit" and tree.lit_type != "bool" else None)
    if shape:   # the checker's output-type rule, for the types a tree's shape alone decides
        raise CelCompileError(f"must evaluate to bool or the unknown type, not {shape}")
    lowered = lower(tree)
    try:
        program = _cel.compile(lowered)
    except ValueError as e:
        raise CelCompileError(f"compilation failed: {str(e).replace('Failed to parse expression', 'Syntax error in')}"
                              ) from None
    indexed, tested, needs = _reads(tree)
    return CompiledSelector(expression, program, tuple(sorted(indexed - tested)), needs, estimate(tree), lowered)


def validate_selector(expression: str) -> CompiledSelector:
    """What the API server checks at create/update (validateCELSelector): a compile error, or an
    expression whose worst-case cost exceeds the limit ("too complex, exceeds cost limit")."""
    compiled = compile_selector(expression)
    if compiled.max_cost > MAX_COST:
        raise CelCostError(f"too complex, exceeds cost limit (estimated worst-case cost {compiled.max_cost}, "
                           f"limit {MAX_COST})")
    return compiled


def device_input(driver: str, attributes: Mapping[str, dict], capacity: Mapping[str, dict],
                 allow_multiple: bool) -> dict:
    """The ``device`` variable for one device, from API-shaped attributes and capacity."""
    attrs = []
    for name, val in attributes.items():
        kind = next((k for k in ("int", "bool", "string", "version") if k in val), "")
        attrs.append((name, kind, val.get(kind)))
    return compiled_device_input(driver, attrs, [(n, Quantity.parse(c["value"])) for n, c in capacity.items()],
                                 allow_multiple)


def compiled_device_input(driver: str, attributes: Any, capacity: Any, allow_multiple: bool) -> dict:
    """The ``device`` variable from ``(name, kind, value)`` attributes and ``(name, Quantity, ...)``
    capacities. Raises CelRuntimeError for an attribute without a value (upstream: "unsupported
    attribute value")."""
    attrs: dict[str, dict] = {}
    for name, kind, val in attributes:
        domain, _, ident = name.rpartition("/")
        domain = domain or driver
        if kind == "int":
            v: Any = int(val)
        elif kind == "bool":
            v = bool(val)
        elif kind == "string":
            v = str(val)
        elif kind == "version":
            try:
                v = parse_semver(str(val))
            except CelRuntimeError as e:
                raise CelRuntimeError(f"attribute {name}: parse semantic version: {e}") from None
        else:
            raise CelRuntimeError(f"attribute {name}: unsupported attribute value")
        attrs.setdefault(domain, {})[ident] = v
    caps: dict[str, dict] = {}
    for entry in capacity:
        name, q = entry[0], entry[1]
        domain, _, ident = name.rpartition("/")
        caps.setdefault(domain or driver, {})[ident] = q_value(q)
    return {"driver": driver, "attributes": attrs, "capacity": caps, "allowMultipleAllocations": allow_multiple}


def _qualify(driver: str, name: str) -> tuple[str, str, str]:
    """(domain, identifier, fully qualified name) of an attribute or capacity name."""
    domain, _, ident = name.rpartition("/")
    domain = domain or driver
    return domain, ident, f"{domain}/{ident}"


class Evaluator:
    """Compiles each expression once and evaluates it against device inputs."""

    def __init__(self) -> None:
        self._compiled: dict[str, CompiledSelector | CelCompileError] = {}
        self._memo: dict[tuple, bool | CelRuntimeError] = {}
        self._split: dict[tuple[str, str], tuple[str, str, str]] = {}
        self._wanted: dict[str, tuple] = {}
        self._context = _cel.Context()
        for name, fn in {**FUNCTIONS, **LIB_FUNCTIONS}.items():
            self._context.add_function(name, fn)

    def compile(self, expression: str) -> CompiledSelector:
        got = self._compiled.get(expression)
        if got is None:
            try:
                got = compile_selector(expression)
            except CelCompileError as e:
                got = e
            self._compiled[expression] = got
        if isinstance(got, CelCompileError):
            raise got
        return got

    def evaluate(self, selector: CompiledSelector, driver: str, attributes: Any, capacity: Any,
                 allow_multiple: bool) -> bool:
        """Evaluate against a compiled device: ``attributes`` as ``(qualified name, kind, value)`` and
        ``capacity`` as ``(name, Quantity, ...)`` tuples. When the selector reads only some entries, the
        result is memoized by their values (most devices share them)."""
        for name, kind, _ in attributes:
            if not kind:
                raise CelRuntimeError(f"attribute {name}: unsupported attribute value")
        needs = selector.needs
        if needs is None:
            return self.matches(selector, compiled_device_input(driver, attributes, capacity, allow_multiple))
        split = self._split
        wanted = self._wanted.get(selector.expression)
        if wanted is None:
            wanted = self._wanted[selector.expression] = (selector.wanted("attributes"), selector.wanted("capacity"))
        (a_names, a_domains), (c_names, c_domains) = wanted
        rel_attrs = []
        for triple in attributes:
            qualified = split.get((driver, triple[0]))
            if qualified is None:
                qualified = split[(driver, triple[0])] = _qualify(driver, triple[0])
            if qualified[2] in a_names or (a_domains and qualified[0] in a_domains):
                rel_attrs.append((qualified[2], triple[1], triple[2]))
        rel_caps = []
        if c_names or c_domains:
            for entry in capacity:
                qualified = split.get((driver, entry[0]))
                if qualified is None:
                    qualified = split[(driver, entry[0])] = _qualify(driver, entry[0])
                if qualified[2] in c_names or qualified[0] in c_domains:
                    rel_caps.append((qualified[2], entry[1].value))
        key = (selector.expression, driver, allow_multiple, tuple(rel_attrs), tuple(rel_caps))
        got = self._memo.get(key)
        if got is None:
            try:
                got = self.matches(selector, compiled_device_input(
                    driver, rel_attrs, [(n, Quantity(v)) for n, v in rel_caps], allow_multiple))
            except CelRuntimeError as e:
                got = e
            if len(self._memo) > 200_000:
                self._memo.clear()
            self._memo[key] = got
        if isinstance(got, CelRuntimeError):
            raise got
        return got

    def matches(self, selector: CompiledSelector, device: dict) -> bool:
        if selector.max_cost > MAX_COST:
            # upstream stops the evaluation once its actual cost passes the limit; this estimate is an upper
            # bound of that, and the API server refuses such expressions at create time anyway
            raise CelRuntimeError("operation cancelled: actual cost limit exceeded")
        if selector.defaults:
            device = dict(device)
            for which, domain in selector.defaults:
                if domain == _DRIVER_DOMAIN:
                    domain = device["driver"]
                if domain not in device[which]:
                    device[which] = {**device[which], domain: {}}
        self._context.add_variable("device", device)
        try:
            result = selector.program.execute(self._context)
        except KeyError as e:
            raise CelRuntimeError(f"no such key: {e.args[0] if e.args else e}") from None
        except CelRuntimeError:
            raise
        except LibError as e:
            raise CelRuntimeError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - the library raises RuntimeError/TypeError/ZeroDivisionError...
            msg = str(e)
            m = re.search(r"Python function call failed: \w+: (.*)", msg)
            raise CelRuntimeError(m.group(1) if m else msg) from None
        if not isinstance(result, bool):
            raise CelRuntimeError(f"CEL result of type {_type_name(result)} could not be converted to bool")
        return result


# -- hints --------------------------------------------------------------------------------------------
def _missing_key_site(expression: str, key: str) -> tuple[str, str] | None:
    """(map, domain) of the lookup ``device.<map>[domain].key`` (or ``[key]``) in ``expression``."""
    try:
        tree = parse(expression)
    except CelSyntaxError:
        return None
    for n in walk(tree):
        if n.kind == "select" and n.value == key or n.kind == "index" and _string_lit(n.args[0]) == key:
            t = n.target
            if t is not None and t.kind == "index" and (which := _device_map(t.target)) and \
                    (domain := _string_lit(t.args[0])) is not None:
                return which, domain
    return None


def runtime_error_hint(message: str, expression: str, driver: str, attributes: Any, capacity: Any) -> str:
    """The one hint the allocator's events and ``partita explain`` give for a selector's runtime error on
    a device (``attributes`` as ``(name, kind, value)``, ``capacity`` as ``(name, Quantity, ...)``):
    for "no such key", the closest names the device has (difflib) and the guarded spellings."""
    m = re.search(r"no such key: (\S+)", message)
    if not m:
        return ""
    key = m.group(1).strip("'\"")
    site = _missing_key_site(expression, key)
    have: dict[str, list[str]] = {"attributes": [], "capacity": []}
    for which, entries in (("attributes", attributes), ("capacity", capacity)):
        for entry in entries:
            domain, ident, _ = _qualify(driver, entry[0])
            if site is None or site == (which, domain):
                have[which].append(ident)
    names = sorted(set(have["attributes"] + have["capacity"]))
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    what = "attribute" if site and site[0] == "attributes" else "capacity" if site else "attribute or capacity"
    where = f" in domain {site[1]}" if site else ""
    text = f"; the device has no {what} {key!r}{where}"
    if close:
        text += " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
    elif names:
        text += f" (it has: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
    if site:
        lookup = f'device.{site[0]}["{site[1]}"]'
        text += (f"; if only some devices have it, guard the lookup: has({lookup}.{key}) && ..., or use optional "
                 f"chaining: {lookup}.?{key}.orValue(<default>)")
    else:
        text += "; if only some devices have it, guard the lookup with has(...) or use optional chaining (.? ... orValue())"
    return text
