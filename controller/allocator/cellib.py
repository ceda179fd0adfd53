"""Kubernetes CEL libraries the DRA selector environment enables, beyond quantity/semver/strings in cel.py.

Upstream's DRA environment (``k8s.io/dynamic-resource-allocation/cel/compile.go``) is the Kubernetes base
environment (``k8s.io/apiserver/pkg/cel/environment/base.go``) plus ``cel.bind``. At the conformance
fixtures' commit that base enables: optional types, cross-type numeric comparisons, ``library.URLs``,
``library.Regex``, ``library.Lists``, ``library.Quantity``, ``ext.Strings`` version 2, ``ext.Sets``,
``library.IP`` and ``library.CIDR``, ``library.Format``, ``ext.TwoVarComprehensions``,
``library.SemverLib`` version 1 and ``ext.Lists`` version 3 (``library.Authz``/``AuthzSelectors`` are
declared too, but need an ``authorizer`` variable, which selectors do not have). ``ext.Math`` is *not*
enabled, so ``math.*`` is an undeclared reference, as upstream.

This module holds the optional helpers the lowering in :mod:`celsyntax` calls, ``ext.Sets``,
``ext.Lists`` v3 (``slice``, ``flatten``, ``distinct``, ``reverse``, ``sort``, ``sortBy``, ``first``,
``last``, ``lists.range``), ``strings.quote`` and ``format`` (ext.Strings v1/v2), the URL, IP and CIDR
libraries and ``library.Format`` (``format.named(n)``, ``format.dns1123Label()`` ... ``.validate(s)``,
with the same rules as the API's name validation; error texts are shorter than upstream's). Values of the
Kubernetes types are tagged maps, as quantities are.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import urllib.parse
from typing import Any, Callable

import cel as _cel

from driver.api import naming
from driver.errors import PartitaError

_URL, _IP, _CIDR = "__url__", "__ip__", "__cidr__"


class LibError(PartitaError):
    """A runtime error of one of these functions (the adapter reports it as a CEL runtime error)."""


# -- optionals (targets of the lowering) ------------------------------------------------------------
_NONE = _cel.OptionalValue.none


def _unwrap(v: Any) -> tuple[bool, Any]:
    if isinstance(v, _cel.OptionalValue):
        return (True, v.value()) if v.has_value() else (False, None)
    return True, v


def opt_select(obj: Any, name: str) -> Any:
    present, v = _unwrap(obj)
    if not present:
        return _NONE()
    if isinstance(v, dict):
        return _cel.OptionalValue.of(v[name]) if name in v else _NONE()
    raise LibError(f"no such overload: optional field selection .?{name} on {type(v).__name__}")


def opt_index(obj: Any, key: Any) -> Any:
    present, v = _unwrap(obj)
    if not present:
        return _NONE()
    if isinstance(v, dict):
        return _cel.OptionalValue.of(v[key]) if key in v else _NONE()
    if isinstance(v, list):
        if isinstance(key, bool) or not isinstance(key, (int, float)) or key != int(key):
            raise LibError(f"no such overload: list index of type {type(key).__name__}")
        return _cel.OptionalValue.of(v[int(key)]) if 0 <= key < len(v) else _NONE()
    raise LibError(f"no such overload: optional index on {type(v).__name__}")


def opt_elems(o: Any) -> list:
    if not isinstance(o, _cel.OptionalValue):
        raise LibError("cannot use a non-optional value as an optional list element ([?x] needs an optional)")
    return [o.value()] if o.has_value() else []


def opt_map(keys: list, values: list, optional: list) -> dict:
    out: dict = {}
    for k, v, opt in zip(keys, values, optional):
        if opt:
            if not isinstance(v, _cel.OptionalValue):
                raise LibError("cannot use a non-optional value as an optional map entry ({?k: v} needs an optional)")
            if not v.has_value():
                continue
            v = v.value()
        out[k] = v
    return out


def pairs(r: Any) -> list:
    if isinstance(r, list):
        return [[i, v] for i, v in enumerate(r)]
    if isinstance(r, dict):
        return [[k, v] for k, v in r.items()]
    raise LibError(f"got '{type(r).__name__}', expected iterable type")


def zip_map(keys: list, values: list) -> dict:
    return dict(zip(keys, values))


# -- ext.Sets ---------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (not isinstance(a, bool) and not isinstance(b, bool)
                                             and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


def _has(lst: list, x: Any) -> bool:
    return any(_same(x, y) for y in lst)


def _lists(*xs: Any) -> None:
    for x in xs:
        if not isinstance(x, list):
            raise LibError(f"no such overload: expected a list, got {type(x).__name__}")


def sets_contains(a: list, b: list) -> bool:
    _lists(a, b)
    return all(_has(a, x) for x in b)


def sets_equivalent(a: list, b: list) -> bool:
    return sets_contains(a, b) and sets_contains(b, a)


def sets_intersects(a: list, b: list) -> bool:
    _lists(a, b)
    return any(_has(a, x) for x in b)


# -- ext.Lists v3 -----------------------------------------------------------------------------------
def _slice(lst: list, start: int, end: int) -> list:
    _lists(lst)
    if start < 0 or end < 0:
        raise LibError(f"cannot slice({start}, {end}), negative indexes not supported")
    if start > end:
        raise LibError(f"cannot slice({start}, {end}), start index must be less than or equal to end index")
    if end > len(lst):
        raise LibError(f"cannot slice({start}, {end}), list is length {len(lst)}")
    return lst[start:end]


def _flatten(lst: list, depth: int = 1) -> list:
    _lists(lst)
    if depth < 0:
        raise LibError("level must be non-negative")
    out: list = []
    for x in lst:
        if isinstance(x, list) and depth > 0:
            out += _flatten(x, depth - 1)
        else:
            out.append(x)
    return out


def _distinct(lst: list) -> list:
    _lists(lst)
    out: list = []
    for x in lst:
        if not _has(out, x):
            out.append(x)
    return out


def _sort(lst: list) -> list:
    _lists(lst)
    kinds = {type(x) for x in lst}
    if len(kinds) > 1 and not kinds <= {int, float}:
        raise LibError("list elements must have the same type")
    if kinds and not kinds <= {int, float, str, bytes, bool}:
        raise LibError("list elements must be comparable")
    return sorted(lst)


def _reverse(lst: Any) -> list:
    if not isinstance(lst, list):   # ext.Strings v2 has no string reverse() (it came in v3)
        raise LibError(f"found no matching overload for 'reverse' applied to '{type(lst).__name__}'")
    return lst[::-1]


def _first(lst: list) -> Any:
    _lists(lst)
    return _cel.OptionalValue.of(lst[0]) if lst else _NONE()


def _last(lst: list) -> Any:
    _lists(lst)
    return _cel.OptionalValue.of(lst[-1]) if lst else _NONE()


def _range(n: int) -> list:
    return list(range(n))


# -- ext.Strings v2: quote, format ------------------------------------------------------------------
def _quote(s: str) -> str:
    out = []
    for c in s:
        out.append({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\a": "\\a", "\b": "\\b",
                    "\f": "\\f", "\v": "\\v"}.get(c, c))
    return '"' + "".join(out) + '"'


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_fmt_value(k)}: {_fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _format(template: str, args: list) -> str:
    out, i, n = [], 0, 0
    while i < len(template):
        c = template[i]
        if c != "%":
            out.append(c)
            i += 1
            continue
        if i + 1 < len(template) and template[i + 1] == "%":
            out.append("%")
            i += 2
            continue
        j = i + 1
        precision = None
        if j < len(template) and template[j] == ".":
            k = j + 1
            while k < len(template) and template[k].isdigit():
                k += 1
            precision = int(template[j + 1:k] or 0)
            j = k
        if j >= len(template):
            raise LibError("unexpected end of format string")
        verb = template[j]
        if n >= len(args):
            raise LibError(f"index {n} out of range")
        v = args[n]
        n += 1
        if verb == "s":
            out.append(v if isinstance(v, str) else _fmt_value(v))
        elif verb == "d":
            if isinstance(v, bool) or not isinstance(v, int):
                raise LibError(f"error during formatting: decimal clause can only be used on integers, was given {type(v).__name__}")
            out.append(str(v))
        elif verb in "fe":
            p = 6 if precision is None else precision
            out.append(f"{float(v):.{p}{verb}}")
        elif verb in "xXob":
            if isinstance(v, str) and verb in "xX":
                h = v.encode().hex()
                out.append(h.upper() if verb == "X" else h)
            else:
                out.append(format(int(v), verb))
        else:
            raise LibError(f"could not parse formatting clause: unrecognized formatting clause \"{verb}\"")
        i = j + 1
    return "".join(out)


# -- library.URLs -----------------------------------------------------------------------------------
def _url(s: str) -> dict:
    p = urllib.parse.urlsplit(s)
    if not s or (not p.scheme and not s.startswith("/")) or " " in s:
        raise LibError(f"URL parse error during conversion from string: parse {s!r}: invalid URI for request")
    return {_URL: s}


def _u(v: Any) -> urllib.parse.SplitResult:
    if isinstance(v, dict) and _URL in v:
        return urllib.parse.urlsplit(v[_URL])
    raise LibError("expected a URL value")


def _is_url(s: Any) -> bool:
    try:
        _url(s)
        return True
    except (LibError, TypeError, ValueError):
        return False


def _host(v: Any) -> str:
    return _u(v).netloc.rpartition("@")[2]


def _hostname(v: Any) -> str:
    h = _host(v)
    if h.startswith("["):
        return h[1:h.index("]")]
    return h.rpartition(":")[0] if ":" in h else h


def _port(v: Any) -> str:
    h = _host(v)
    tail = h[h.index("]") + 1:] if h.startswith("[") else h
    return tail.rpartition(":")[2] if ":" in tail else ""


# -- library.IP and library.CIDR --------------------------------------------------------------------
def _ip(s: str) -> dict:
    try:
        a = ipaddress.ip_address(s)
    except ValueError:
        raise LibError(f"IP Address {s!r} parse error during conversion from string: ParseAddr({s!r}): "
                       "unable to parse IP") from None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        raise LibError(f"IPv4-mapped IPv6 address {s!r} is not allowed")
    if "%" in s:
        raise LibError(f"IP address with zone value {s!r} is not allowed")
    return {_IP: str(a)}


def _a(v: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(v, dict) and _IP in v:
        return ipaddress.ip_address(v[_IP])
    raise LibError("expected an IP value")


def _is_ip(s: Any) -> bool:
    try:
        _ip(s)
        return True
    except (LibError, TypeError):
        return False


def _ip_is_canonical(s: str) -> bool:
    return str(_a(_ip(s))) == s


def _cidr(s: str) -> dict:
    try:
        n = ipaddress.ip_interface(s)
    except ValueError:
        raise LibError(f"network address parse error during conversion from string: network address parse error "
                       f"during conversion from string: netip.ParsePrefix({s!r}): bad prefix") from None
    if "/" not in s:
        raise LibError(f"network address parse error during conversion from string: netip.ParsePrefix({s!r}): "
                       "no '/'")
    return {_CIDR: str(n)}


def _c(v: Any) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if isinstance(v, dict) and _CIDR in v:
        return ipaddress.ip_interface(v[_CIDR])
    raise LibError("expected a CIDR value")


def _is_cidr(s: Any) -> bool:
    try:
        _cidr(s)
        return True
    except (LibError, TypeError):
        return False


def _contains_ip(c: Any, ip: Any) -> bool:
    addr = _a(_ip(ip)) if isinstance(ip, str) else _a(ip)
    return addr in _c(c).network


def _contains_cidr(c: Any, other: Any) -> bool:
    o = _c(_cidr(other)) if isinstance(other, str) else _c(other)
    mine = _c(c).network
    return o.version == mine.version and o.network.subnet_of(mine)   # type: ignore[arg-type]


def _family(v: Any) -> int:
    return _a(v).version


def _ip_member(v: Any) -> dict:
    """``cidr.ip()``: the address of a CIDR."""
    return {_IP: str(_c(v).ip)}


def _masked(v: Any) -> dict:
    return {_CIDR: str(_c(v).network)}


def _prefix_length(v: Any) -> int:
    return _c(v).network.prefixlen


# -- ext.Lists sortBy, ext.TwoVarComprehensions transformMapEntry (targets of the lowering) ------------
def sort_by(lst: list, keys: list) -> list:
    _lists(lst, keys)
    _sort(keys)          # the keys must be comparable, as upstream requires
    order = sorted(range(len(lst)), key=lambda i: keys[i])
    return [lst[i] for i in order]


def merge_entries(entries: list) -> dict:
    out: dict = {}
    for e in entries:
        if not isinstance(e, dict):
            raise LibError(f"transformMapEntry: the entry must be a map, got {type(e).__name__}")
        for k, v in e.items():
            if k in out:
                raise LibError(f"insert failed: key {k} already exists")
            out[k] = v
    return out


# -- library.Format -----------------------------------------------------------------------------------
_F = "__format__"
_LABEL = re.compile(f"^{naming.DNS_LABEL.pattern}$")
_SUBDOMAIN = re.compile(f"^{naming.DNS_SUBDOMAIN.pattern}$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QNAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _pattern_check(pattern: re.Pattern, limit: int, what: str) -> Callable[[str], list[str]]:
    def check(s: str) -> list[str]:
        errs = []
        if len(s) > limit:
            errs.append(f"must be no more than {limit} characters")
        if not pattern.match(s):
            errs.append(f"a {what} must match the regex {pattern.pattern[1:-1]!r}")
        return errs
    return check


def _prefix(check: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    return lambda s: check(s[:-1] if s.endswith("-") else s)


def _qualified(s: str) -> list[str]:
    prefix, sep, name = s.rpartition("/")
    errs = []
    if sep and (not prefix or len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        errs.append("prefix part must be a lowercase RFC 1123 subdomain")
    if not name or len(name) > 63 or not _QNAME.match(name):
        errs.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                    "with an alphanumeric character, at most 63 characters")
    return errs


def _uri(s: str) -> list[str]:
    p = urllib.parse.urlsplit(s)
    return [] if (p.scheme or s.startswith("/")) and " " not in s else ["invalid URI"]


def _base64(s: str) -> list[str]:
    try:
        base64.b64decode(s, validate=True)
        return []
    except (ValueError, binascii.Error):
        return ["invalid base64"]


FORMATS: dict[str, Callable[[str], list[str]]] = {
    "dns1123Label": _pattern_check(_LABEL, 63, "lowercase RFC 1123 label"),
    "dns1123Subdomain": _pattern_check(_SUBDOMAIN, 253, "lowercase RFC 1123 subdomain"),
    "dns1035Label": _pattern_check(_DNS1035, 63, "DNS-1035 label"),
    "qualifiedName": _qualified,
    "labelValue": _pattern_check(_LABEL_VALUE, 63, "valid label"),
    "uri": _uri, "uuid": _pattern_check(_UUID, 36, "UUID"), "byte": _base64,
    "date": _pattern_check(_DATE, 10, "date (YYYY-MM-DD)"),
    "datetime": _pattern_check(_DATETIME, 64, "RFC 3339 date-time"),
}
FORMATS["dns1123LabelPrefix"] = _prefix(FORMATS["dns1123Label"])
FORMATS["dns1123SubdomainPrefix"] = _prefix(FORMATS["dns1123Subdomain"])
FORMATS["dns1035LabelPrefix"] = _prefix(FORMATS["dns1035Label"])


def _format_named(name: str) -> Any:
    return _cel.OptionalValue.of({_F: name}) if name in FORMATS else _NONE()


def _validate(fmt: Any, s: str) -> Any:
    if not (isinstance(fmt, dict) and fmt.get(_F) in FORMATS):
        raise LibError("no such overload: validate() needs a format (format.named(...) or format.<name>())")
    errs = FORMATS[fmt[_F]](s)
    return _cel.OptionalValue.of(errs) if errs else _NONE()


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "_optSelect": opt_select, "_optIndex": opt_index, "_optElems": opt_elems, "_optMap": opt_map,
    "_pairs": pairs, "_zipMap": zip_map,
    "sets.contains": sets_contains, "sets.equivalent": sets_equivalent, "sets.intersects": sets_intersects,
    "slice": _slice, "flatten": _flatten, "distinct": _distinct, "sort": _sort, "reverse": _reverse,
    "first": _first, "last": _last, "lists.range": _range,
    "strings.quote": _quote, "format": _format,
    "url": _url, "isURL": _is_url, "getScheme": lambda v: _u(v).scheme, "getHost": _host,
    "getHostname": _hostname, "getPort": _port, "getEscapedPath": lambda v: _u(v).path,
    "getQuery": lambda v: {k: vs for k, vs in urllib.parse.parse_qs(_u(v).query, keep_blank_values=True).items()},
    "ip": lambda v: _ip(v) if isinstance(v, str) else _ip_member(v), "isIP": _is_ip,
    "ip.isCanonical": _ip_is_canonical, "family": _family,
    "isUnspecified": lambda v: _a(v).is_unspecified, "isLoopback": lambda v: _a(v).is_loopback,
    "isLinkLocalMulticast": lambda v: _a(v).is_multicast and _a(v).is_link_local,
    "isLinkLocalUnicast": lambda v: _a(v).is_link_local and not _a(v).is_multicast,
    "isGlobalUnicast": lambda v: not (_a(v).is_multicast or _a(v).is_loopback or _a(v).is_link_local
                                      or _a(v).is_unspecified or str(_a(v)) == "255.255.255.255"),
    "cidr": _cidr, "isCIDR": _is_cidr, "containsIP": _contains_ip, "containsCIDR": _contains_cidr,
    "masked": _masked, "prefixLength": _prefix_length,
    "_sortBy": sort_by, "_mergeEntries": merge_entries,
    "format.named": _format_named, "validate": _validate,
    **{f"format.{name}": (lambda name=name: {_F: name}) for name in FORMATS},
}
