"""Selectors in CEL: the device variable, Kubernetes functions, errors and bounds."""

from __future__ import annotations

import pytest

from controller.allocator.cel import CelCompileError, CelRuntimeError, Evaluator, device_input

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


def test_runtime_and_compile_errors(ev) -> None:
    with pytest.raises(CelRuntimeError, match="no such key: nope"):
        check(ev, "device.attributes['gpu.partita.dev'].nope == 'x'")
    with pytest.raises(CelRuntimeError, match="could not be converted to bool"):
        check(ev, "device.attributes['gpu.partita.dev'].numaNode")
    with pytest.raises(CelRuntimeError, match="quantity 'ten' is not valid"):
        check(ev, "quantity('ten') == quantity('1')")
    with pytest.raises(CelCompileError, match="syntax error"):
        ev.compile("device.driver ==")
    with pytest.raises(CelCompileError, match="undeclared reference to 'nosuch'"):
        ev.compile("nosuch(1)")
    with pytest.raises(CelCompileError, match="undeclared reference to 'other'"):
        ev.compile("other.driver == 'x'")
    with pytest.raises(CelCompileError, match=r"optional field selection \(\.\?\)"):
        ev.compile("device.attributes['gpu.partita.dev'].?type.orValue('') == 'gpu'")


def test_attribute_without_a_value_is_an_error_for_the_device() -> None:
    with pytest.raises(CelRuntimeError, match="attribute broken: unsupported attribute value"):
        device_input("d", {"broken": {}}, {}, False)


def test_cost_bounds(ev) -> None:
    with pytest.raises(CelCompileError, match="more than the limit of 10240"):
        ev.compile("true && " * 1500 + "true")
    with pytest.raises(CelCompileError, match="nested more than 3 deep"):
        ev.compile("[1].all(a, [1].all(b, [1].all(c, [1].all(d, true))))")
    assert check(ev, "[1].all(a, [1].all(b, [1].all(c, true)))") is True


def test_compile_once(ev) -> None:
    expr = "device.driver == 'gpu.partita.dev' && true"
    assert ev.compile(expr) is ev.compile(expr)
