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


def parse_semver(text: str, normalize: bool = False) -> dict:
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
_DOMAIN_IN = re.compile(r"""(?:'([^']*)'|"([^"]*)")\s+in\s+device\.(attributes|capacity)\b""")


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


@dataclass(frozen=True)
class CompiledSelector:
    expression: str
    program: Any
    #: domains the expression indexes: (map name, domain) pairs to default to {} when missing
    defaults: tuple[tuple[str, str], ...]


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
    return CompiledSelector(expression, program, tuple(sorted(indexed - tested)))


def device_input(driver: str, attributes: Mapping[str, dict], capacity: Mapping[str, dict],
                 allow_multiple: bool) -> dict:
    """The ``device`` variable for one device, from API-shaped attributes and capacity.

    Raises CelRuntimeError for an attribute without a value (upstream: "unsupported attribute value")."""
    attrs: dict[str, dict] = {}
    for name, val in attributes.items():
        domain, _, ident = name.rpartition("/")
        domain = domain or driver
        if "int" in val:
            v: Any = int(val["int"])
        elif "bool" in val:
            v = bool(val["bool"])
        elif "string" in val:
            v = str(val["string"])
        elif "version" in val:
            try:
                v = parse_semver(str(val["version"]))
            except CelRuntimeError as e:
                raise CelRuntimeError(f"attribute {name}: parse semantic version: {e}") from None
        else:
            raise CelRuntimeError(f"attribute {name}: unsupported attribute value")
        attrs.setdefault(domain, {})[ident] = v
    caps: dict[str, dict] = {}
    for name, c in capacity.items():
        domain, _, ident = name.rpartition("/")
        caps.setdefault(domain or driver, {})[ident] = q_value(Quantity.parse(c["value"]))
    return {"driver": driver, "attributes": attrs, "capacity": caps, "allowMultipleAllocations": allow_multiple}


class Evaluator:
    """Compiles each expression once and evaluates it against device inputs."""

    def __init__(self) -> None:
        self._compiled: dict[str, CompiledSelector | CelCompileError] = {}
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
