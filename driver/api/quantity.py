"""Kubernetes ``resource.Quantity``: parse, compare, add and print canonically.

Follows k8s.io/apimachinery ``pkg/api/resource/quantity.go``: the suffix decides the format
(binary ``Ki..Ei``, decimal ``n u m "" k M G T P E``, or ``e<exp>``); values are exact (a
:class:`fractions.Fraction`), rounded up to nano units when printed; the canonical form uses the
largest suffix that keeps an integer mantissa (``1536Mi`` -> ``1536Mi``, ``1073741824`` as binary
-> ``1Gi``, ``1500m`` stays ``1500m``, ``0.5`` -> ``500m``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import total_ordering

from driver.errors import PartitaError

BINARY_SI = "BinarySI"
DECIMAL_SI = "DecimalSI"
DECIMAL_EXPONENT = "DecimalExponent"

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_BY_EXP = {v: k for k, v in _DECIMAL.items()}
_BINARY_BY_EXP = {v: k for k, v in _BINARY.items()}

_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?:(?P<exp>[eE][+-]?\d+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$"
)

_NANO = Fraction(1, 10**9)
_MAX_ALLOWED = 2**63 - 1


class QuantityError(PartitaError, ValueError):
    """A string that is not a valid Kubernetes quantity."""


@total_ordering
@dataclass(frozen=True)
class Quantity:
    """An exact quantity plus the format it prints in."""

    value: Fraction
    format: str = DECIMAL_SI

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | int | float | "Quantity") -> "Quantity":
        if isinstance(text, Quantity):
            return text
        if isinstance(text, bool):
            raise QuantityError(f"quantity {text!r}: a boolean is not a quantity")
        if isinstance(text, int):
            return cls(Fraction(text), DECIMAL_SI)
        if isinstance(text, float):
            if not math.isfinite(text):
                raise QuantityError(f"quantity {text!r}: not a finite number")
            return cls(Fraction(str(text)), DECIMAL_SI)
        if not isinstance(text, str):
            raise QuantityError(f"quantity {text!r}: expected a string such as '10Gi' or '500m'")
        s = text.strip()
        m = _QUANTITY.match(s)
        if not m or s == "":
            raise QuantityError(
                f"quantity {text!r} is not valid: expected a number with an optional suffix "
                "(Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E) or exponent (e.g. 1e3)"
            )
        num = Fraction(m.group("num"))
        suffix = m.group("suffix") or ""
        if m.group("exp"):
            value, fmt = num * Fraction(10) ** int(m.group("exp")[1:]), DECIMAL_EXPONENT
        elif suffix in _BINARY:
            value, fmt = num * 1024 ** _BINARY[suffix], BINARY_SI
        else:
            value, fmt = num * Fraction(10) ** _DECIMAL[suffix], DECIMAL_SI
        if value == 0:
            return cls(value, fmt)
        # As ParseQuantity does: the magnitude is rounded up to whole nano units (asking for a tiny amount still
        # gets some), a binary value is capped at 2^63-1, and a binary value below one prints as decimal.
        mag = _round_up_nano(abs(value))
        if fmt == BINARY_SI:
            mag = min(mag, Fraction(_MAX_ALLOWED))
            if mag < 1:
                fmt = DECIMAL_SI
        return cls(mag if value > 0 else -mag, fmt)

    @classmethod
    def from_int(cls, value: int, fmt: str = DECIMAL_SI) -> "Quantity":
        return cls(Fraction(value), fmt)

    @classmethod
    def bytes(cls, value: int) -> "Quantity":
        return cls(Fraction(value), BINARY_SI)

    # -- arithmetic and comparison ------------------------------------------------------------
    def __add__(self, other: "Quantity | int") -> "Quantity":
        return Quantity(self.value + _as_fraction(other), self._format_with(other))

    def __sub__(self, other: "Quantity | int") -> "Quantity":
        return Quantity(self.value - _as_fraction(other), self._format_with(other))

    def _format_with(self, other: "Quantity | int") -> str:
        """Upstream's Add and Sub: a zero takes the other operand's format (0 + 1Gi prints 1Gi)."""
        if self.value == 0 and isinstance(other, Quantity):
            return other.format
        return self.format

    def __neg__(self) -> "Quantity":
        return Quantity(-self.value, self.format)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Quantity, int)):
            return self.value == _as_fraction(other)
        return NotImplemented

    def __lt__(self, other: "Quantity | int") -> bool:
        return self.value < _as_fraction(other)

    def __hash__(self) -> int:
        return hash(self.value)

    def cmp(self, other: "Quantity | int") -> int:
        o = _as_fraction(other)
        return (self.value > o) - (self.value < o)

    def sign(self) -> int:
        return (self.value > 0) - (self.value < 0)

    def is_integer(self) -> bool:
        return self.value.denominator == 1

    def as_int(self) -> int:
        """The value rounded up to an integer (as ``Quantity.Value()`` does)."""
        return math.ceil(self.value)

    def as_float(self) -> float:
        return float(self.value)

    def milli(self) -> int:
        """The value in milli-units, rounded up (as ``Quantity.MilliValue()`` does)."""
        return math.ceil(self.value * 1000)

    # -- printing -----------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.canonical()

    def __repr__(self) -> str:
        return f"Quantity({self.canonical()!r})"

    def canonical(self) -> str:
        # Values are kept to nano precision, rounded up (away from -inf), like the Go type.
        v = _round_up_nano(self.value)
        fmt = self.format
        if fmt == BINARY_SI:
            if -1024 < v < 1024 or v.denominator != 1:
                fmt = DECIMAL_SI
            else:
                n = int(v)
                exp = 0
                while exp < 6 and n % 1024 == 0 and n != 0:
                    n //= 1024
                    exp += 1
                return f"{n}{_BINARY_BY_EXP[exp] if exp else ''}"
        mantissa, exp10 = _decimal_parts(v)
        # DecimalSI has no suffix beyond E (10^18): larger values print with an exponent, as upstream does.
        if fmt == DECIMAL_EXPONENT or exp10 > 18:
            return f"{mantissa}e{exp10}" if exp10 else f"{mantissa}"
        return f"{mantissa}{_DECIMAL_BY_EXP[exp10]}"


def _as_fraction(other: "Quantity | int") -> Fraction:
    if isinstance(other, Quantity):
        return other.value
    if isinstance(other, int) and not isinstance(other, bool):
        return Fraction(other)
    raise TypeError(f"cannot combine a quantity with {type(other).__name__}")


def _round_up_nano(v: Fraction) -> Fraction:
    if (v / _NANO).denominator == 1:
        return v
    return Fraction(math.ceil(v / _NANO)) * _NANO


def _decimal_parts(v: Fraction) -> tuple[int, int]:
    """Integer mantissa and the largest exponent (a multiple of 3, at least -9) that keeps it an integer."""
    if v == 0:
        return 0, 0
    n = math.ceil(v / _NANO)          # v is in whole nano units after rounding
    exp = -9
    while n % 1000 == 0:
        n //= 1000
        exp += 3
    return n, exp


def parse_quantity(text: str | int | Quantity) -> Quantity:
    return Quantity.parse(text)


def format_bytes(n: int) -> str:
    """Canonical binary form of a byte count, e.g. ``85521825792`` -> ``81559Mi``."""
    return Quantity.bytes(n).canonical()
