"""Selectors in CEL: the device variable, Kubernetes functions, errors and bounds."""

from __future__ import annotations

import re

import pytest

from controller.allocator.cel import (MAX_COST, CelCompileError, CelCostError, CelRuntimeError, Evaluator, device_input,
                                      runtime_error_hint, validate_selector)
from controller.allocator.celsyntax import lower, parse

DEV = device_input("gpu.partita.dev", {
    "type": {"string": "gpu"}, "productName": {"string": "NVIDIA H100 80GB HBM3"}, "numaNode": {"int": 1},
    "migCapable": {"bool": True}, "driverVersion": {"version": "580.105.8"},
    "resource.kubernetes.io/pcieRoot": {"string": "pci0000:15"}}, {"memory": {"value": "81559Mi"}}, False)


@pytest.fixture(scope="module")
def ev():
    return Evaluator()


def check(ev, expr, device=DEV):
    return ev.matches(ev.compile(expr), device)


@pytest.mark.parametrize("expr", [
    "device.driver == 'gpu.partita.dev'",
    "device.attributes['gpu.partita.dev'].type == 'gpu' && device.attributes['gpu.partita.dev'].numaNode == 1",
    "device.attributes['gpu.partita.dev'].migCapable",
    "device.attributes['resource.kubernetes.io'].pcieRoot == 'pci0000:15'",
    "device.capacity['gpu.partita.dev'].memory.compareTo(quantity('80Gi')) < 0",
    "device.capacity['gpu.partita.dev'].memory.isGreaterThan(quantity('40Gi'))",
    "quantity('500m').isLessThan(quantity('1')) && quantity('1.5Gi').add(quantity('512Mi')) == quantity('2Gi')",
    "quantity('2Gi').sub(quantity('1Gi')).asInteger() == 1073741824 && quantity('1500m').asApproximateFloat() == 1.5",
    "quantity('1').isInteger() && !quantity('1500m').isInteger() && quantity('-3').sign() == -1 && sign(quantity('0')) == 0",
    "quantity('1Gi') == quantity('1073741824')",
    "isQuantity('10Gi') && !isQuantity('ten')",
    "device.attributes['gpu.partita.dev'].driverVersion.isGreaterThan(semver('550.0.0'))",
    "semver('1.10.0').compareTo(semver('1.9.0')) == 1 && semver('1.2.3-rc.1').isLessThan(semver('1.2.3'))",
    "semver('v2.1', true).major() == 2 && semver('v2.1', true).minor() == 1 && semver('2.1.7').patch() == 7",
    "isSemver('1.2.3') && !isSemver('1.2')",
    "device.attributes['gpu.partita.dev'].productName.lowerAscii().contains('h100')",
    "'a,b'.split(',') == ['a', 'b'] && ['a', 'b'].join('-') == 'a-b' && ' x '.trim() == 'x'",
    "'hello'.indexOf('l') == 2 && 'hello'.lastIndexOf('l') == 3 && 'hello'.substring(1, 3) == 'el'",
    "'abc'.upperAscii() == 'ABC' && 'abc'.replace('b', 'x') == 'axc' && 'abc'.charAt(1) == 'b'",
    "[3, 1, 2].sum() == 6 && [1, 2].isSorted() && ['a', 'b'].indexOf('b') == 1",
    "'gpu-x'.find('[0-9]+') == '' && 'a1b22'.findAll('[0-9]+') == ['1', '22']",
    "device.attributes['gpu.partita.dev'].exists(k, k == 'type')",
    "device.allowMultipleAllocations == false",
    "'type' in device.attributes['gpu.partita.dev'] && !('nope' in device.attributes['gpu.partita.dev'])",
    "has(device.attributes['gpu.partita.dev'].type) && !has(device.attributes['gpu.partita.dev'].nope)",
])
def test_true_expressions(ev, expr) -> None:
    assert check(ev, expr) is True


def test_a_missing_domain_reads_as_an_empty_map_but_in_stays_false(ev) -> None:
    assert check(ev, "size(device.attributes['other.example.com']) == 0") is True
    assert check(ev, "'other.example.com' in device.attributes") is False
    assert check(ev, "'other.example.com' in device.attributes && device.attributes['other.example.com'].x == 1") is False
    with pytest.raises(CelRuntimeError, match="no such key: x"):
        check(ev, "device.attributes['other.example.com'].x == 1")


def test_the_devices_own_domain_by_device_driver_reads_as_an_empty_map_too(ev) -> None:
    """Found by the differential test against upstream: ``"ver" in device.attributes[device.driver]`` on a device
    without attributes in its driver's domain is false upstream (unsatisfiable), not a missing-key error."""
    bare = device_input("driver-a", {}, {}, False)
    assert check(ev, "'ver' in device.attributes[device.driver]", bare) is False
    assert check(ev, "size(device.capacity[device.driver]) == 0", bare) is True
    assert check(ev, "device.driver in device.attributes", bare) is False
    assert check(ev, "device.attributes[device.driver].type == 'gpu'") is True     # a device that has them
    with pytest.raises(CelRuntimeError, match="no such key: x"):
        check(ev, "device.attributes[device.driver].x == 1", bare)


def test_runtime_and_compile_errors(ev) -> None:
    with pytest.raises(CelRuntimeError, match="no such key: nope"):
        check(ev, "device.attributes['gpu.partita.dev'].nope == 'x'")
    with pytest.raises(CelRuntimeError, match="could not be converted to bool"):
        check(ev, "device.attributes['gpu.partita.dev'].numaNode")
    with pytest.raises(CelRuntimeError, match="quantity 'ten' is not valid"):
        check(ev, "quantity('ten') == quantity('1')")
    with pytest.raises(CelCompileError, match="compilation failed: Syntax error"):
        ev.compile("device.driver ==")
    with pytest.raises(CelCompileError, match="undeclared reference to 'nosuch'"):
        ev.compile("nosuch(1)")
    with pytest.raises(CelCompileError, match="undeclared reference to 'other'"):
        ev.compile("other.driver == 'x'")
    with pytest.raises(CelCompileError, match="undeclared reference to 'math.greatest'"):   # ext.Math is not enabled
        ev.compile("math.greatest(1, 2) == 2")
    with pytest.raises(CelCompileError, match="must evaluate to bool or the unknown type, not string"):
        ev.compile("'gpu'")
    with pytest.raises(CelCompileError, match="must evaluate to bool or the unknown type, not list"):
        ev.compile("[true]")
    # the checker's overload resolution: no heterogeneous ==, no ordering on quantities
    for expr, message in [("device.driver == 1", "'_==_' applied to '(string, int)'"),
                          ("device.attributes['gpu.partita.dev'].numaNode == 1 && 1 == 1.0", "'_==_' applied to '(int, double)'"),
                          ("device.capacity['gpu.partita.dev'].memory > quantity('1Gi')", "'_>_' applied to '(Quantity, Quantity)'"),
                          ("size('ab') == 2u", "'_==_' applied to '(int, uint)'"),
                          ("device.driver + 1 == 'x'", "'_+_' applied to '(string, int)'")]:
        with pytest.raises(CelCompileError, match=f"found no matching overload for {re.escape(message)}"):
            ev.compile(expr)
    for fine in ["1 < 1.5 && 2u > 1", "'a' < 'b' && b'a' == b'a' && r'a' == 'a'",
                 "device.attributes['gpu.partita.dev'].numaNode == 1.0 || true"]:     # dyn compares with anything
        ev.compile(fine)
    with pytest.raises(CelCompileError, match="invalid argument to has"):
        ev.compile("has(device)")
    with pytest.raises(CelCompileError, match="undeclared reference to 'format.nosuch'"):
        ev.compile("!format.nosuch().validate('x').hasValue()")
    with pytest.raises(CelRuntimeError, match="no matching overload for 'reverse'"):   # ext.Strings v2: no string reverse
        check(ev, "'abc'.reverse() == 'cba'")


def test_attribute_without_a_value_is_an_error_for_the_device() -> None:
    with pytest.raises(CelRuntimeError, match="attribute broken: unsupported attribute value"):
        device_input("d", {"broken": {}}, {}, False)


SEVEN_DEEP = ("[1, 2, 3, 4, 5, 6, 7, 8, 9, 10].all(x, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].all(y, [1, 2, 3, 4, 5, 6, 7, 8, "
              "9, 10].all(z, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].all(z2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].all(z3, [1, 2, "
              "3, 4, 5, 6, 7, 8, 9, 10].all(z4, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].all(z5, int('1'.find('[0-9]*')) < "
              "100)))))))")


def test_cost_bounds(ev) -> None:
    with pytest.raises(CelCompileError, match="more than the limit of 10240"):
        ev.compile("true && " * 1500 + "true")
    # upstream's "expensive" case (compile_test.go): it compiles, its worst-case estimate (85,555,551
    # upstream) is over the limit, the API server refuses it and evaluating it fails
    compiled = ev.compile(SEVEN_DEEP)
    assert compiled.max_cost > MAX_COST
    with pytest.raises(CelCostError, match="too complex, exceeds cost limit"):
        validate_selector(SEVEN_DEEP)
    with pytest.raises(CelRuntimeError, match="actual cost limit exceeded"):
        check(ev, SEVEN_DEEP)
    # nesting as such is no limit: small ranges stay cheap, as upstream
    assert check(ev, "[1].all(a, [1].all(b, [1].all(c, [1].all(d, true))))") is True
    assert validate_selector("[1].all(a, [1].all(b, [1].all(c, [1].all(d, true))))").max_cost < 100
    # upstream's estimates for flat selectors (compile_test.go, expectCost)
    for expr, upstream in [('device.attributes["dra.example.com"].name', 4), ('device.driver == ""', 2),
                           ('device.driver == "dra.example.com"', 4), ('"dra.example.com" in device.attributes', 3),
                           ('device.attributes["dra.example.com"].name > 0', 5),
                           ('device.attributes["dra.example.com"].name == "fish"', 5),
                           ('cel.bind(dra, device.attributes["dra.example.com"], dra.name)', 15),
                           ('device.capacity["dra.example.com"].name.isGreaterThan(quantity("1Ki"))', 6),
                           ('"name" in device.capacity["dra.example.com"] && '
                            'device.capacity["dra.example.com"].name.isGreaterThan(quantity("1Ki"))', 10)]:
        assert ev.compile(expr).max_cost == upstream, expr
    # flat selectors cost a few units, loops over attributes multiply by 32 entries per map
    assert validate_selector("device.attributes['gpu.partita.dev'].numaNode > 0").max_cost < 10
    nested = "device.attributes.all(d, device.attributes[d].all(k, k.startsWith('x')))"
    assert 32 * 32 <= validate_selector(nested).max_cost <= MAX_COST
    with pytest.raises(CelCostError):   # four nested loops over the 32x32 attribute maps
        validate_selector("device.attributes.all(a, device.attributes[a].all(b, device.attributes.all(c, "
                          "device.attributes[c].all(e, b.matches(e) && a.matches(c)))))")


def test_compile_once(ev) -> None:
    expr = "device.driver == 'gpu.partita.dev' && true"
    assert ev.compile(expr) is ev.compile(expr)


# -- optionals (cel.OptionalTypes in the Kubernetes base environment) --------------------------------
@pytest.mark.parametrize("expr, want", [
    ("device.attributes['gpu.partita.dev'].?rack.orValue('none') == 'none'", True),
    ("device.attributes['gpu.partita.dev'].?type.orValue('none') == 'gpu'", True),
    ("device.attributes['gpu.partita.dev'].?type.hasValue() && !device.attributes['gpu.partita.dev'].?rack.hasValue()", True),
    ("device.attributes['gpu.partita.dev'].?numaNode.value() == 1", True),
    ("device.attributes['other.example.com'].?x.orValue(7) == 7", True),                # missing domain: empty map
    ("device.attributes[?'gpu.partita.dev'].?type.orValue('') == 'gpu'", True),
    ("device.attributes[?'other.example.com'].hasValue()", True),       # upstream's map finds every domain
    ("device.attributes['gpu.partita.dev'][?'productName'].orValue('').startsWith('NVIDIA')", True),
    ("device.capacity['gpu.partita.dev'].?memory.orValue(quantity('0')).isGreaterThan(quantity('80Gi'))", False),
    ("device.capacity['gpu.partita.dev'].?bandwidth.orValue(quantity('0')) == quantity('0')", True),
    ("{'a': {'b': 1}}.?a.b.orValue(0) == 1 && {'a': {'b': 1}}.?a.c.orValue(0) == 0", True),  # chain stays optional
    ("{'a': {'b': 1}}.?z.b.orValue(5) == 5", True),
    ("[1, 2][?1].orValue(0) == 2 && [1, 2][?5].orValue(0) == 0", True),
    ("optional.of(1).value() == 1 && !optional.none().hasValue() && optional.none().orValue(3) == 3", True),
    ("optional.ofNonZeroValue(0).orValue(9) == 9 && optional.none().or(optional.of(2)).value() == 2", True),
    ("[?optional.of(1), ?optional.none(), 2] == [1, 2]", True),
    ("{?'a': optional.of(1), ?'b': optional.none()} == {'a': 1}", True),
    ("'a.?b' == 'a.?b'", True),                                                           # inside a string: text
])
def test_optional_syntax_and_types(ev, expr, want) -> None:
    assert check(ev, expr) is want


def test_optional_value_errors_like_upstream(ev) -> None:
    with pytest.raises(CelRuntimeError, match=r"optional.none\(\) dereference"):
        check(ev, "device.attributes['gpu.partita.dev'].?rack.value() == 'r1'")
    with pytest.raises(CelRuntimeError, match="optional list element"):
        check(ev, "[?1] == [1]")


def test_lowering_is_a_parse_not_a_text_rewrite() -> None:
    assert lower(parse("a.?b.c")) == '_optSelect(_optSelect(a, "b"), "c")'
    assert lower(parse("x['.?'].f")) == "((x)['.?']).f"
    assert lower(parse("cel.bind(v, 1, v + v)")) == "[1].map(v, (v) + (v))[0]"


# -- the rest of upstream's environment ---------------------------------------------------------------
@pytest.mark.parametrize("expr", [
    # ext.Bindings
    "cel.bind(g, device.attributes['gpu.partita.dev'], g.type == 'gpu' && g.numaNode == 1)",
    # ext.TwoVarComprehensions
    "[10, 20].all(i, v, v == (i + 1) * 10) && {'a': 1}.exists(k, v, k == 'a' && v == 1)",
    "[1, 2, 3].existsOne(i, v, v == 2) && [1, 2].transformList(i, v, v * 2) == [2, 4]",
    "[1, 2, 3].transformList(i, v, i > 0, v) == [2, 3] && {'a': 1}.transformMap(k, v, v + 1) == {'a': 2}",
    "device.attributes['gpu.partita.dev'].exists(k, v, k == 'numaNode' && v == 1)",
    # ext.Sets
    "sets.contains([1, 2, 3], [1, 2]) && !sets.contains([1], [2]) && sets.equivalent([1, 2], [2, 1, 1])",
    "sets.intersects([1, 2], [2, 5]) && !sets.intersects([1], [5])",
    # ext.Lists v3
    "[1, 2, 3, 4].slice(1, 3) == [2, 3] && [1, [2, [3]]].flatten() == [1, 2, [3]] && [1, [2, [3]]].flatten(2) == [1, 2, 3]",
    "[3, 1, 2].sort() == [1, 2, 3] && ['b', 'a'].sort() == ['a', 'b'] && [1, 1, 2].distinct() == [1, 2]",
    "[1, 2].reverse() == [2, 1] && lists.range(3) == [0, 1, 2] && [1, 2].first().value() == 1 && [].last().orValue(0) == 0",
    # ext.Strings v2
    "strings.quote('a\"b') == '\"a\\\\\"b\"' && '%s has %d GPUs'.format(['node', 2]) == 'node has 2 GPUs'",
    "'%.2f'.format([1.5]) == '1.50' && '%x'.format([255]) == 'ff'",
    # library.URLs
    "url('https://a.example:8443/p?q=1').getScheme() == 'https' && url('https://a.example:8443/p').getHostname() == 'a.example'",
    "url('https://a.example:8443/p').getPort() == '8443' && url('https://a.example/p/x').getEscapedPath() == '/p/x'",
    "isURL('https://a.example') && !isURL('not a url') && url('https://a/?k=v').getQuery() == {'k': ['v']}",
    # library.IP / library.CIDR
    "ip('10.0.0.1').family() == 4 && ip('::1').family() == 6 && ip('127.0.0.1').isLoopback() && isIP('::1') && !isIP('x')",
    "ip('0.0.0.0').isUnspecified() && ip('169.254.1.1').isLinkLocalUnicast() && ip('8.8.8.8').isGlobalUnicast()",
    "ip.isCanonical('10.0.0.1') && !ip.isCanonical('2001:db8:0:0::1')",
    "cidr('10.0.0.0/8').containsIP('10.1.2.3') && cidr('10.0.0.0/8').containsIP(ip('10.1.2.3')) && !cidr('10.0.0.0/8').containsIP('11.0.0.1')",
    "cidr('10.0.0.0/8').containsCIDR('10.1.0.0/16') && cidr('10.1.2.3/16').masked() == cidr('10.1.0.0/16')",
    "cidr('10.1.0.0/16').prefixLength() == 16 && cidr('10.1.2.3/16').ip() == ip('10.1.2.3') && isCIDR('10.0.0.0/8') && !isCIDR('10.0.0.1')",
    # ext.Lists sortBy, ext.TwoVarComprehensions transformMapEntry
    "[3, 1, 2].sortBy(x, -x) == [3, 2, 1] && ['bb', 'a'].sortBy(s, size(s)) == ['a', 'bb']",
    "{'a': 1, 'b': 2}.transformMapEntry(k, v, {v: k}) == {1: 'a', 2: 'b'}",
    "{'a': 1, 'b': 2}.transformMapEntry(k, v, v > 1, {k + k: v}) == {'bb': 2}",
    # library.Format
    "!format.dns1123Label().validate('gpu-0').hasValue() && format.dns1123Label().validate('GPU_0').hasValue()",
    "format.named('dns1123Subdomain').value().validate('a.example.com') == optional.none()",
    "!format.named('nosuch').hasValue() && format.qualifiedName().validate('gpu.partita.dev/type') == optional.none()",
    "format.labelValue().validate('has space').value().size() > 0 && !format.uuid().validate("
    "'123e4567-e89b-12d3-a456-426614174000').hasValue() && !format.date().validate('2026-12-07').hasValue()",
    "!format.dns1123LabelPrefix().validate('gpu-').hasValue() && format.dns1123Label().validate('gpu-').hasValue()",
    # cross-type numeric comparisons
    "1 < 1.5 && 2u > 1",
])
def test_kubernetes_libraries(ev, expr) -> None:
    assert check(ev, expr) is True


# -- one hint for a missing attribute ----------------------------------------------------------------
ATTRS = [("type", "string", "gpu"), ("productName", "string", "x"), ("numaNode", "int", 1)]


def test_missing_attribute_hint_names_the_closest_names_and_a_guard() -> None:
    expr = "device.attributes['gpu.partita.dev'].productname == 'x'"
    hint = runtime_error_hint("no such key: productname", expr, "gpu.partita.dev", ATTRS, [])
    assert "did you mean 'productName'?" in hint
    assert 'device.attributes["gpu.partita.dev"].?productname.orValue(<default>)' in hint
    assert 'has(device.attributes["gpu.partita.dev"].productname)' in hint
    # the suggested spelling compiles and runs
    assert check(Evaluator(), "device.attributes[\"gpu.partita.dev\"].?productname.orValue('y') == 'y'") is True
    far = runtime_error_hint("no such key: rack", "device.attributes['gpu.partita.dev'].rack == 'r'",
                             "gpu.partita.dev", ATTRS, [])
    assert "did you mean" not in far and "it has: numaNode, productName, type" in far
    assert runtime_error_hint("no such overload", expr, "gpu.partita.dev", ATTRS, []) == ""


def test_missing_capacity_hint_looks_at_capacity_names() -> None:
    from driver.api.quantity import Quantity
    hint = runtime_error_hint("no such key: memroy", "device.capacity['gpu.partita.dev'].memroy.isGreaterThan(quantity('1'))",
                              "gpu.partita.dev", ATTRS, [("memory", Quantity.parse("1Gi"))])
    assert "the device has no capacity 'memroy'" in hint and "did you mean 'memory'?" in hint
