"""Consumable capacity (upstream ``consumable_capacity.go``): what a request consumes of a device's
capacity, request policies (default, validValues, validRange with rounding up) and the over-capacity
check. Quantities are exact (driver.api.quantity)."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Mapping

from driver.api.quantity import BINARY_SI, Quantity
from driver.errors import PartitaError

Capacity = tuple   # ((name, value Quantity, requestPolicy dict | None), ...) as compiled devices hold it


class UnknownCapacity(PartitaError):
    """The request names a capacity the device does not have: the device is skipped."""


def _qp(v) -> Quantity:  # noqa: ANN001
    """A request policy's quantity, parsed once per distinct text (policies repeat on every device)."""
    try:
        return _parsed(v)
    except TypeError:           # unhashable: parse it each time (Quantity.parse says what is wrong)
        return Quantity.parse(v)


@lru_cache(maxsize=1024, typed=True)
def _parsed(v) -> Quantity:  # noqa: ANN001
    return Quantity.parse(v)


def _int_value(q: Quantity) -> int:
    return math.ceil(q.value)


def consumed(requested: Quantity | None, value: Quantity, policy: dict | None) -> Quantity:
    if requested is None:
        if policy and policy.get("default") is not None:
            return _qp(policy["default"])
        return value
    if not policy:
        return requested
    rng = policy.get("validRange")
    if rng and rng.get("min") is not None:
        lo = _qp(rng["min"])
        if requested < lo:
            return lo
        if rng.get("step") is None:
            return requested
        step, req, mn = _int_value(_qp(rng["step"])), _int_value(requested), _int_value(lo)
        n, mod = divmod(req - mn, step)
        if mod:
            n += 1
        return Quantity.from_int(mn + step * n, BINARY_SI)
    if policy.get("validValues"):
        for v in policy["validValues"]:
            if requested <= _qp(v):
                return _qp(v)
        return requested
    return requested


def violates_policy(value: Quantity, policy: dict | None) -> bool:
    if not policy:
        return False
    if policy.get("default") is not None and value == _qp(policy["default"]):
        return False
    rng = policy.get("validRange")
    if rng is not None:
        if rng.get("max") is not None and value > _qp(rng["max"]):
            return True
        if rng.get("step") is not None:
            step, mn = _int_value(_qp(rng["step"])), _int_value(_qp(rng["min"]))
            return (_int_value(value) - mn) % step != 0
        return False
    values = policy.get("validValues") or []
    if values:
        return not any(value == _qp(v) for v in values)
    return False


def consumption(requests: Mapping[str, Quantity] | None, capacity: Capacity) -> dict[str, Quantity]:
    """What allocating the device for a request consumes of each of its capacities."""
    return {name: consumed((requests or {}).get(name), value, policy) for name, value, policy in capacity}


def fits(current: Mapping[str, Quantity], requests: Mapping[str, Quantity] | None, capacity: Capacity,
         allocating: Mapping[str, Quantity]) -> bool:
    """Whether the request fits beside what is consumed and being allocated (raises UnknownCapacity)."""
    if not requests and not current and not allocating and all(c[2] is None for c in capacity):
        return True     # each capacity consumed whole, by this request alone: it fits exactly
    if requests:
        names = {c[0] for c in capacity}
        for name in requests:
            if name not in names:
                raise UnknownCapacity(name)
    for name, value, policy in capacity:
        use = consumed((requests or {}).get(name), value, policy)
        if violates_policy(use, policy):
            return False
        total = use.value + current.get(name, Quantity.from_int(0)).value + allocating.get(name, Quantity.from_int(0)).value
        if total > value.value:
            return False
    return True
