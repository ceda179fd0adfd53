"""driver/api/quantity.py against k8s.io/apimachinery's own cases.

The tables are our translation of ``pkg/api/resource/quantity_test.go`` (kubernetes/apimachinery, Apache-2.0):
TestQuantityParse (value and format after parsing, with the same inputs negated and with an explicit ``+``),
its invalid inputs, TestQuantityString (canonical form, and the alternate spelling that canonicalizes to it),
TestQuantityParseEmit and TestQuantityCmp. ``(i, e)`` below is upstream's ``decQuantity(i, e, format)``: the value
``i * 10**e``.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from driver.api.quantity import BINARY_SI, DECIMAL_EXPONENT, DECIMAL_SI, Quantity, QuantityError

MAX_ALLOWED = 2**63 - 1   # upstream maxAllowed: a parsed value saturates here

# TestQuantityParse: input -> ((mantissa, exponent), format)
PARSE = [
    ("0", (0, 0), DECIMAL_SI), ("0n", (0, 0), DECIMAL_SI), ("0u", (0, 0), DECIMAL_SI), ("0m", (0, 0), DECIMAL_SI),
    ("0Ki", (0, 0), BINARY_SI), ("0k", (0, 0), DECIMAL_SI), ("0Mi", (0, 0), BINARY_SI), ("0M", (0, 0), DECIMAL_SI),
    ("0Gi", (0, 0), BINARY_SI), ("0G", (0, 0), DECIMAL_SI), ("0Ti", (0, 0), BINARY_SI), ("0T", (0, 0), DECIMAL_SI),
    ("1", (1, 0), DECIMAL_SI),
    ("1Ki", (1024, 0), BINARY_SI), ("8Ki", (8 * 1024, 0), BINARY_SI), ("7Mi", (7 * 1024**2, 0), BINARY_SI),
    ("6Gi", (6 * 1024**3, 0), BINARY_SI), ("5Ti", (5 * 1024**4, 0), BINARY_SI), ("4Pi", (4 * 1024**5, 0), BINARY_SI),
    ("3Ei", (3 * 1024**6, 0), BINARY_SI), ("10Ti", (10 * 1024**4, 0), BINARY_SI),
    ("100Ti", (100 * 1024**4, 0), BINARY_SI),
    ("5n", (5, -9), DECIMAL_SI), ("4u", (4, -6), DECIMAL_SI), ("3m", (3, -3), DECIMAL_SI), ("9", (9, 0), DECIMAL_SI),
    ("8k", (8, 3), DECIMAL_SI), ("50k", (5, 4), DECIMAL_SI), ("7M", (7, 6), DECIMAL_SI), ("6G", (6, 9), DECIMAL_SI),
    ("5T", (5, 12), DECIMAL_SI), ("40T", (4, 13), DECIMAL_SI), ("300T", (3, 14), DECIMAL_SI),
    ("2P", (2, 15), DECIMAL_SI), ("1E", (1, 18), DECIMAL_SI),
    ("1E-3", (1, -3), DECIMAL_EXPONENT), ("1e3", (1, 3), DECIMAL_EXPONENT), ("1E6", (1, 6), DECIMAL_EXPONENT),
    ("1e9", (1, 9), DECIMAL_EXPONENT), ("1E12", (1, 12), DECIMAL_EXPONENT), ("1e15", (1, 15), DECIMAL_EXPONENT),
    ("1E18", (1, 18), DECIMAL_EXPONENT), ("1e14", (1, 14), DECIMAL_EXPONENT), ("1e13", (1, 13), DECIMAL_EXPONENT),
    ("100.035k", (100035, 0), DECIMAL_SI),
    ("0.001", (1, -3), DECIMAL_SI), ("0.0005k", (5, -1), DECIMAL_SI), ("0.005", (5, -3), DECIMAL_SI),
    ("0.05", (5, -2), DECIMAL_SI), ("0.5", (5, -1), DECIMAL_SI), ("0.00050k", (5, -1), DECIMAL_SI),
    ("0.00500", (5, -3), DECIMAL_SI), ("0.05000", (5, -2), DECIMAL_SI), ("0.50000", (5, -1), DECIMAL_SI),
    ("0.5e0", (5, -1), DECIMAL_EXPONENT), ("0.5e-1", (5, -2), DECIMAL_EXPONENT),
    ("0.5e-2", (5, -3), DECIMAL_EXPONENT), ("10.035M", (10035, 3), DECIMAL_SI),
    ("1.2e3", (12, 2), DECIMAL_EXPONENT), ("1.3E+6", (13, 5), DECIMAL_EXPONENT),
    ("1.40e9", (14, 8), DECIMAL_EXPONENT), ("1.53E12", (153, 10), DECIMAL_EXPONENT),
    ("1.6e15", (16, 14), DECIMAL_EXPONENT), ("1.7E18", (17, 17), DECIMAL_EXPONENT),
    ("9.01", (901, -2), DECIMAL_SI), ("8.1k", (81, 2), DECIMAL_SI), ("7.123456M", (7123456, 0), DECIMAL_SI),
    ("6.987654321G", (6987654321, 0), DECIMAL_SI), ("5.444T", (5444, 9), DECIMAL_SI),
    ("40.1T", (401, 11), DECIMAL_SI), ("300.2T", (3002, 11), DECIMAL_SI), ("2.5P", (25, 14), DECIMAL_SI),
    ("1.01E", (101, 16), DECIMAL_SI),
    # things that saturate or round (up, to nano units, away from zero)
    ("3.001n", (4, -9), DECIMAL_SI), ("1.1E-9", (2, -9), DECIMAL_EXPONENT), ("0.0000000001", (1, -9), DECIMAL_SI),
    ("0.0000000005", (1, -9), DECIMAL_SI), ("0.00000000050", (1, -9), DECIMAL_SI),
    ("0.5e-9", (1, -9), DECIMAL_EXPONENT), ("0.9n", (1, -9), DECIMAL_SI), ("0.00000012345", (124, -9), DECIMAL_SI),
    ("0.00000012354", (124, -9), DECIMAL_SI), ("9Ei", (MAX_ALLOWED, 0), BINARY_SI),
    ("9223372036854775807Ki", (MAX_ALLOWED, 0), BINARY_SI), ("12E", (12, 18), DECIMAL_SI),
    # fractional binary
    ("100.035Ki", (10243584, -2), BINARY_SI), ("0.5Mi", (524288, 0), BINARY_SI),
    ("0.05Gi", (536870912, -1), BINARY_SI), ("0.025Ti", (274877906944, -1), BINARY_SI),
    # "things written by trolls"
    ("0.000000000001Ki", (2, -9), DECIMAL_SI), (".001", (1, -3), DECIMAL_SI), (".0001k", (100, -3), DECIMAL_SI),
    ("1.", (1, 0), DECIMAL_SI), ("1.G", (1, 9), DECIMAL_SI),
]

# Upstream's ParseQuantity also refuses " 1" and "1 "; we parse values of API objects, which upstream decodes with
# UnmarshalJSON, and that trims the white space first (TestJSONWhitespace): see test_white_space_is_trimmed.
INVALID = ["", "1.1.M", "1+1.0M", "0.1mi", "0.1am", "aoeu", ".5i", "1i", "-3.01i", "-3.01e-", " ", "1 1"]

# TestQuantityString: (value, format) -> canonical, and an alternate spelling that canonicalizes to it
STRING = [
    ((1024**3, 0), BINARY_SI, "1Gi", "1024Mi"), ((300 * 1024**2, 0), BINARY_SI, "300Mi", "307200Ki"),
    ((6 * 1024, 0), BINARY_SI, "6Ki", ""), ((1001 * 1024**3, 0), BINARY_SI, "1001Gi", "1025024Mi"),
    ((1024**4, 0), BINARY_SI, "1Ti", "1024Gi"), ((5, 0), BINARY_SI, "5", "5000m"),
    ((500, -3), BINARY_SI, "500m", "0.5"), ((1, 9), DECIMAL_SI, "1G", "1000M"),
    ((1000, 6), DECIMAL_SI, "1G", "0.001T"), ((1000000, 3), DECIMAL_SI, "1G", ""),
    ((1000000000, 0), DECIMAL_SI, "1G", ""), ((1, -3), DECIMAL_SI, "1m", "1000u"), ((80, -3), DECIMAL_SI, "80m", ""),
    ((1080, -3), DECIMAL_SI, "1080m", "1.08"), ((108, -2), DECIMAL_SI, "1080m", "1080000000n"),
    ((10800, -4), DECIMAL_SI, "1080m", ""), ((300, 6), DECIMAL_SI, "300M", ""), ((1, 12), DECIMAL_SI, "1T", ""),
    ((1, 18), DECIMAL_SI, "1E", ""), ((1, 21), DECIMAL_SI, "1e21", "1000E"), ((5, 21), DECIMAL_SI, "5e21", "5000E"),
    ((1, 24), DECIMAL_SI, "1e24", "1000000E"), ((1234567, 6), DECIMAL_SI, "1234567M", ""),
    ((1234567, -3), BINARY_SI, "1234567m", ""), ((3, 3), DECIMAL_SI, "3k", ""), ((1025, 0), BINARY_SI, "1025", ""),
    ((0, 0), DECIMAL_SI, "0", ""), ((0, 0), BINARY_SI, "0", ""), ((1, 9), DECIMAL_EXPONENT, "1e9", ".001e12"),
    ((1, -3), DECIMAL_EXPONENT, "1e-3", "0.001e0"), ((1, -9), DECIMAL_EXPONENT, "1e-9", "1000e-12"),
    ((80, -3), DECIMAL_EXPONENT, "80e-3", ""), ((300, 6), DECIMAL_EXPONENT, "300e6", ""),
    ((1, 12), DECIMAL_EXPONENT, "1e12", ""), ((1, 3), DECIMAL_EXPONENT, "1e3", ""),
    ((3, 3), DECIMAL_EXPONENT, "3e3", ""), ((0, 0), DECIMAL_EXPONENT, "0", "00"), ((1, -9), DECIMAL_SI, "1n", ""),
    ((80, -9), DECIMAL_SI, "80n", ""), ((1080, -9), DECIMAL_SI, "1080n", ""), ((108, -8), DECIMAL_SI, "1080n", ""),
    ((10800, -10), DECIMAL_SI, "1080n", ""), ((1, -6), DECIMAL_SI, "1u", ""), ((80, -6), DECIMAL_SI, "80u", ""),
    ((1080, -6), DECIMAL_SI, "1080u", ""),
]

# TestQuantityParseEmit
EMIT = [("1Ki", "1Ki"), ("1Mi", "1Mi"), ("1Gi", "1Gi"), ("1024Mi", "1Gi"), ("1000M", "1G"), (".001Ki", "1024m"),
        (".000001Ki", "1024u"), (".000000001Ki", "1024n"), (".000000000001Ki", "2n")]

# TestQuantityCmp
CMP = [("0", "0", 0), ("100m", "50m", 1), ("50m", "100m", -1), ("10000T", "100Gi", 1)]


def _value(m_e: tuple[int, int]) -> Fraction:
    m, e = m_e
    return Fraction(m) * Fraction(10) ** e


@pytest.mark.parametrize("text,value,fmt", PARSE, ids=[p[0] for p in PARSE])
def test_parse_value_and_format(text, value, fmt) -> None:
    for sign, prefix in ((1, ""), (1, "+"), (-1, "-")):
        q = Quantity.parse(prefix + text)
        assert q.value == sign * _value(value), prefix + text
        assert q.format == fmt, prefix + text


@pytest.mark.parametrize("text", INVALID)
def test_invalid_quantities_are_refused(text) -> None:
    with pytest.raises(QuantityError):
        Quantity.parse(text)


@pytest.mark.parametrize("value,fmt,canonical,alternate", STRING, ids=[s[2] + "/" + s[1] for s in STRING])
def test_canonical_string(value, fmt, canonical, alternate) -> None:
    q = Quantity(_value(value), fmt)
    assert q.canonical() == canonical
    assert Quantity.parse(canonical).canonical() == canonical
    if alternate:
        assert Quantity.parse(alternate).canonical() == canonical
    if q.value:
        assert Quantity(-q.value, fmt).canonical() == "-" + canonical


@pytest.mark.parametrize("text,canonical", EMIT)
def test_parse_then_emit(text, canonical) -> None:
    assert Quantity.parse(text).canonical() == canonical
    assert Quantity.parse("-" + text).canonical() == "-" + canonical


@pytest.mark.parametrize("x,y,expect", CMP)
def test_compare(x, y, expect) -> None:
    assert Quantity.parse(x).cmp(Quantity.parse(y)) == expect
    assert Quantity.parse(y).cmp(Quantity.parse(x)) == -expect


def test_adding_zero_keeps_the_suffix() -> None:
    """TestQuantityAddZeroPreservesSuffix / SubZero."""
    for text in ("100m", "1Gi"):
        q, zero = Quantity.parse(text), Quantity.parse("0")
        assert (q + zero).canonical() == text
        assert (zero + q).canonical() == text
        assert (q - zero).canonical() == text
        assert (zero - q).canonical() == "-" + text


def test_white_space_is_trimmed_as_json_decoding_does() -> None:
    """TestJSONWhitespace: ``" 1"``, ``"1 "`` and `` -1`` decode as 1, 1 and -1."""
    assert [Quantity.parse(t).canonical() for t in (" 1", "1 ", " -1", "10")] == ["1", "1", "-1", "10"]
