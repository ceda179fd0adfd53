"""Claim constraints (upstream constraint.go and matchAttributeConstraint): ``matchAttribute`` — every
device of the covered requests has the same value; ``distinctAttribute`` — all values differ.

``requests`` empty means every request; a main request name covers its subrequests, ``req/sub`` one
subrequest. A device without the attribute never satisfies either constraint. As upstream, the distinct
constraint remembers one value per request name (a known imprecision for count > 1, kept for identical
results)."""

from __future__ import annotations

from typing import Any, Protocol

from .pools import CDevice


def lookup_attribute(dev: CDevice, name: str) -> tuple[str, Any] | None:
    """(kind, value) of a fully qualified attribute; the driver's own domain may be omitted on the device."""
    domain, sep, ident = name.partition("/")
    short = ident if sep and domain == dev.id.driver else None
    found = None
    for aname, kind, value in dev.attrs:
        if aname == name:
            return (kind, value) if kind else ("", None)
        if short is not None and aname == short:
            found = (kind, value) if kind else ("", None)
    return found


def _value(attr: tuple[str, Any]) -> tuple[str, Any] | None:
    return attr if attr[0] else None


class Constraint(Protocol):
    def add(self, request: str, subrequest: str, dev: CDevice) -> bool: ...

    def remove(self, request: str, subrequest: str, dev: CDevice) -> None: ...


class _Base:
    """What both constraints share: which requests they cover, the attribute lookup and the count of devices
    added; a subclass says whether a value fits beside those added (:meth:`_fits`) and what it remembers."""

    def __init__(self, requests: set[str], attribute: str):
        self.requests = requests
        self.attribute = attribute
        self.count = 0

    def applies(self, request: str, subrequest: str) -> bool:
        if not self.requests:
            return True
        if not subrequest:
            return request in self.requests
        return request in self.requests or f"{request}/{subrequest}" in self.requests

    def add(self, request: str, subrequest: str, dev: CDevice) -> bool:
        if not self.applies(request, subrequest):
            return True
        attr = lookup_attribute(dev, self.attribute)
        if attr is None:
            return False
        val = _value(attr)
        if self.count and (val is None or not self._fits(val)):
            return False
        self._record(request, val)
        self.count += 1
        return True

    def remove(self, request: str, subrequest: str, dev: CDevice) -> None:
        if self.applies(request, subrequest):
            self._forget(request)
            self.count -= 1

    def _fits(self, val: tuple[str, Any]) -> bool:
        raise NotImplementedError

    def _record(self, request: str, val: tuple[str, Any] | None) -> None:
        raise NotImplementedError

    def _forget(self, request: str) -> None:
        pass


class MatchAttribute(_Base):
    def __init__(self, requests: set[str], attribute: str):
        super().__init__(requests, attribute)
        self.value: tuple[str, Any] | None = None

    def _fits(self, val: tuple[str, Any]) -> bool:
        return val == self.value

    def _record(self, request: str, val: tuple[str, Any] | None) -> None:
        if self.count == 0:         # the first device sets the value every later one must have
            self.value = val


class DistinctAttribute(_Base):
    def __init__(self, requests: set[str], attribute: str):
        super().__init__(requests, attribute)
        self.values: dict[str, tuple[str, Any] | None] = {}

    def _fits(self, val: tuple[str, Any]) -> bool:
        return all(v != val for v in self.values.values())

    def _record(self, request: str, val: tuple[str, Any] | None) -> None:
        self.values[request] = val

    def _forget(self, request: str) -> None:
        self.values.pop(request, None)
