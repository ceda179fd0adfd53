"""Device selectors in CEL, as the Kubernetes DRA allocator evaluates them, on ``common-expression-language``.

The ``device`` variable has ``driver``, ``attributes`` and ``capacity`` (maps from domain to maps from
identifier to value; unqualified names belong to the driver's domain) and ``allowMultipleAllocations``.
On top of the CEL standard library this adapter provides what the Kubernetes CEL environment adds for
selectors:

* ``quantity(s)``, ``isQuantity(s)`` and the Quantity members ``compareTo``, ``isGreaterThan``,
  ``isLessThan``, ``add``, ``sub``, ``asInteger``, ``asApproximateFloat``, ``isInteger``, ``sign``;
* ``semver(s[, normalize])``, ``isSemver(s[, normalize])`` and the members ``major``, ``minor``,
  ``patch``, ``compareTo``, ``isGreaterThan``, ``isLessThan`` (version attributes are Semver values);
* string extensions ``lowerAscii``, ``upperAscii``, ``trim``, ``replace``, ``split``, ``join``,
  ``indexOf``, ``lastIndexOf``, ``substring``, ``charAt``, ``reverse``; regex ``find``, ``findAll``;
  list functions ``sum``, ``min``, ``max``, ``isSorted``, ``indexOf``, ``lastIndexOf``.

Quantities and versions are passed through the library as tagged maps (it cannot hold opaque Python
values), so ``==`` between two quantities compares values exactly.

Known differences from the Go implementation (documented, checked by tests):

* Optional syntax (``.?x``, ``orValue``) is not parsed by the library: such expressions fail to compile
  with a message that says so. Use ``has()`` or ``in`` guards instead.
* A missing domain reads as an empty map (as upstream) because every domain an expression names in
  ``device.attributes[...]`` / ``device.capacity[...]`` is added as an empty map when the device lacks
  it — unless the expression also tests it with ``'<domain>' in device.attributes``, in which case it is
  left absent so that test stays false.
* No cost estimation: instead an expression is limited to 10Ki characters (as the API validates) and to
  comprehensions nested at most 3 deep; device data is small, so evaluation time stays bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from fractions import Fraction
from typing import Any, Callable, Mapping

import cel as _cel

from driver.api.quantity import Quantity, QuantityError

MAX_EXPRESSION_LENGTH = 10 * 1024
MAX_COMPREHENSION_NESTING = 3
_Q = "__quantity__"
_V = "__semver__"


class CelError(Exception):
    """A selector could not be compiled or evaluated; ``str()`` is the upstream-style detail."""


class CelCompileError(CelError):
    pass


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
    "reverse": lambda s: s[::-1],
    "find": lambda s, pat: (m.group(0) if (m := re.search(pat, s)) else ""),
    "findAll": lambda s, pat, n=-1: [m.group(0) for m in re.finditer(pat, s)][: (n if n >= 0 else None)],
    "sum": lambda lst: sum(lst),
    "min": lambda lst: min(lst),
    "max": lambda lst: max(lst),
    "isSorted": lambda lst: all(lst[i] <= lst[i + 1] for i in range(len(lst) - 1)),
}
_BUILTINS = {"size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double", "string", "bool",
             "bytes", "type", "has", "duration", "timestamp", "dyn", "exists", "exists_one", "all", "map", "filter",
             "getFullYear", "getMonth", "getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getHours",
             "getMinutes", "getSeconds", "getMilliseconds", "max", "min"}
_COMPREHENSION = re.compile(r"\.(all|exists|exists_one|map|filter)\s*\(")
_STRING_LIT = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""")
_DOMAIN_INDEX = re.compile(r"""device\.(attributes|capacity)\s*\[\s*(?:'([^']*)'|"([^"]*)")\s*\]""")
_DOMAIN_IN = re.compile(r"""(?:'([^']*)'|"([^"]*)")\s+in\s+device\.(attributes|capacity)\b(?!\s*\[)""")


def _comprehension_nesting(expr: str) -> int:
    starts = {m.end() - 1 for m in _COMPREHENSION.finditer(expr)}   # index of each macro's "("
    stack: list[bool] = []
    deepest = 0
    for i, ch in enumerate(expr):
        if ch == "(":
            stack.append(i in starts)
            deepest = max(deepest, sum(stack))
        elif ch == ")" and stack:
            stack.pop()
    return deepest


_KEY_ACCESS = re.compile(r"""^\.\s*([A-Za-z_]\w*)(?!\w)(?!\s*\()""")
_IN_KEY = re.compile(r"""(?:'([A-Za-z_]\w*)'|"([A-Za-z_]\w*)")\s+in\s+$""")
_HAS = re.compile(r"""has\(\s*$""")


def _needs(expression: str) -> frozenset[tuple[str, str, str]] | None:
    """The attribute/capacity entries an expression reads, when every access is ``map[lit].name``,
    ``has(map[lit].name)`` or ``'name' in map[lit]``; None when it could read more (a domain map used
    as a whole, or ``device.attributes`` without a literal domain)."""
    text = expression
    total = len(re.findall(r"device\.(?:attributes|capacity)\b", text))
    needs: set[tuple[str, str, str]] = set()
    found = 0
    for m in _DOMAIN_INDEX.finditer(text):
        found += 1
        which, domain = m.group(1), m.group(2) or m.group(3) or ""
        after = text[m.end():]
        key = _KEY_ACCESS.match(after)
        if key:
            needs.add((which, domain, key.group(1)))
            continue
        before = text[:m.start()]
        k = _IN_KEY.search(before)
        if k:
            needs.add((which, domain, k.group(1) or k.group(2)))
            continue
        return None
    for m in _DOMAIN_IN.finditer(text):
        found += 1
        needs.add((m.group(3), m.group(1) or m.group(2) or "", ""))   # domain presence only
    if found != total:
        return None
    return frozenset(needs)


@dataclass(frozen=True)
class CompiledSelector:
    expression: str
    program: Any
    #: domains the expression indexes: (map name, domain) pairs to default to {} when missing
    defaults: tuple[tuple[str, str], ...]
    #: (map, domain, name) entries the expression can read, or None when it may read anything (e.g. it
    #: iterates a map): lets the evaluator pass only those and memoize results by their values
    needs: frozenset[tuple[str, str, str]] | None = None

    def wanted(self, which: str) -> tuple[frozenset[str], frozenset[str]]:
        """(fully qualified names, whole domains) of ``which`` (attributes/capacity) the expression reads."""
        names = frozenset(f"{d}/{n}" for w, d, n in self.needs or () if w == which and n)
        domains = frozenset(d for w, d, n in self.needs or () if w == which and not n)
        return names, domains


def compile_selector(expression: str) -> CompiledSelector:
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise CelCompileError(f"expression is {len(expression)} characters long, more than the limit of "
                              f"{MAX_EXPRESSION_LENGTH}")
    if ".?" in _STRING_LIT.sub("", expression):
        raise CelCompileError("optional field selection (.?) is not supported by Partita's CEL evaluator; guard "
                              "the lookup with has(...) or 'name' in ... instead")
    if _comprehension_nesting(_STRING_LIT.sub('""', expression)) > MAX_COMPREHENSION_NESTING:
        raise CelCompileError(f"comprehensions (all/exists/exists_one/map/filter) are nested more than "
                              f"{MAX_COMPREHENSION_NESTING} deep; this bounds the evaluation cost — simplify it")
    try:
        program = _cel.compile(expression)
    except ValueError as e:
        raise CelCompileError(str(e).replace("Failed to parse expression", "syntax error in").strip()) from None
    refs = program.references()
    unknown = sorted(f for f in refs.get("functions", []) if not f.startswith(("_", "@", "!"))
                     and f not in FUNCTIONS and f not in _BUILTINS)
    if unknown:
        raise CelCompileError(f"undeclared reference to {', '.join(repr(u) for u in unknown)} (unknown function; "
                              "see the supported functions in Partita's documentation)")
    variables = {v for v in refs.get("variables", [])}
    bound = set(re.findall(r"\.(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)", expression))
    unknown_vars = sorted(variables - {"device"} - bound)
    if unknown_vars:
        raise CelCompileError(f"undeclared reference to {', '.join(repr(v) for v in unknown_vars)} (the only "
                              "variable is 'device')")
    tested = {(m.group(3), m.group(1) or m.group(2) or "") for m in _DOMAIN_IN.finditer(expression)}
    indexed = {(m.group(1), m.group(2) or m.group(3) or "") for m in _DOMAIN_INDEX.finditer(expression)}
    return CompiledSelector(expression, program, tuple(sorted(indexed - tested)), _needs(expression))


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
        for name, fn in FUNCTIONS.items():
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
        if selector.defaults:
            device = dict(device)
            for which, domain in selector.defaults:
                if domain not in device[which]:
                    device[which] = {**device[which], domain: {}}
        self._context.add_variable("device", device)
        try:
            result = selector.program.execute(self._context)
        except KeyError as e:
            raise CelRuntimeError(f"no such key: {e.args[0] if e.args else e}") from None
        except CelRuntimeError:
            raise
        except Exception as e:  # noqa: BLE001 - the library raises RuntimeError/TypeError/ZeroDivisionError...
            msg = str(e)
            m = re.search(r"Python function call failed: \w+: (.*)", msg)
            raise CelRuntimeError(m.group(1) if m else msg) from None
        if not isinstance(result, bool):
            raise CelRuntimeError(f"CEL result of type {_type_name(result)} could not be converted to bool")
        return result
