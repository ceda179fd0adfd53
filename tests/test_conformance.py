"""The conformance runner: its contract (controller/allocator/conformance.py) and every fixture: the upstream cases
(tests/reference/conformance, and ../shared/conformance/allocator where present) and our own (tests/fixtures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.allocator.conformance", str(directory)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def _all_pass(directory: Path) -> None:
    res = _run(directory)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    count = len(list(directory.glob("*.yaml")))
    assert count and lines[-1] == f"{count} passed, 0 failed"
    assert all(line.startswith("PASS ") for line in lines[:-1])


def test_upstream_fixtures_pass_in_first_fit(reference_dir) -> None:
    _all_pass(reference_dir / "conformance")


def test_the_reference_sets_fixtures_pass_in_first_fit(shared_dir) -> None:
    """The runner accepts any directory: the reference set may hold more cases than our copy."""
    _all_pass(shared_dir / "conformance" / "allocator")


def test_partita_fixtures_pass() -> None:
    res = _run(REPO / "tests" / "fixtures" / "allocator")
    assert res.returncode == 0, res.stdout
    assert res.stdout.splitlines()[-1].endswith("passed, 0 failed")


def test_failures_unreadable_and_unsupported_fixtures_are_reported(tmp_path, reference_dir) -> None:
    good = (reference_dir / "conformance" / "01-simple.yaml").read_text()
    (tmp_path / "a-wrong.yaml").write_text(good.replace("device: device-1}", "device: device-9}"))
    (tmp_path / "b-broken.yaml").write_text("schema: [unclosed")
    (tmp_path / "c-lists.yaml").write_text(good.replace("features: []", "features: [DRAListTypeAttributes]")
                                           .replace("name: simple", "name: lists"))
    (tmp_path / "d-ok.yaml").write_text(good)
    res = _run(tmp_path)
    assert res.returncode == 1
    out = res.stdout.splitlines()
    assert out[0].startswith("FAIL simple: claim claim-0: results")
    assert out[1].startswith("FAIL b-broken.yaml: cannot read fixture")
    assert out[2] == "FAIL lists: feature(s) not implemented by Partita: DRAListTypeAttributes"
    assert out[3] == "PASS simple"
    assert out[-1] == "1 passed, 3 failed"


@pytest.mark.parametrize("path", sorted((REPO / "tests" / "fixtures" / "allocator").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_partita_fixture(path) -> None:
    from controller.allocator.conformance import load, run_fixture

    assert run_fixture(load(path)) == ""


def _same_named_claims(reference_dir, expected_devices: list[str], order: str) -> dict:
    """Two claims both named ``claim`` (namespaces a and b, as upstream's several-different-drivers case names two
    claims alike) on a slice of two devices; first-fit gives claim #0 device-1 and claim #1 device-2."""
    import copy

    import yaml

    doc = yaml.safe_load((reference_dir / "conformance" / "01-simple.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["input"]["resourceSlices"][0]["spec"]["devices"] = [{"name": "device-1"}, {"name": "device-2"}]
    [claim] = doc["input"]["claims"]
    doc["input"]["claims"] = []
    for ns in ("a", "b"):
        c = copy.deepcopy(claim)
        c["metadata"] = {"name": "claim", "namespace": ns}
        doc["input"]["claims"].append(c)
    [alloc] = doc["expected"]["allocations"]
    doc["expected"]["allocations"] = []
    for dev in expected_devices:
        a = copy.deepcopy(alloc)
        a["claim"] = "claim"
        a["allocation"]["devices"]["results"][0]["device"] = dev
        doc["expected"]["allocations"].append(a)
    doc["compare"]["claimOrder"] = order
    return doc


@pytest.mark.parametrize("order", ["exact", "ignore"])
def test_allocations_are_matched_to_claims_by_position_not_by_name(reference_dir, order) -> None:
    from controller.allocator.conformance import run_fixture

    assert run_fixture(_same_named_claims(reference_dir, ["device-1", "device-2"], order)) == ""
    # matching by name kept only the last claim's result, so both claims "had" device-2
    assert "device-2" in run_fixture(_same_named_claims(reference_dir, ["device-2", "device-2"], order))
    assert run_fixture(_same_named_claims(reference_dir, ["device-1"], order)).startswith("2 allocations")
    swapped = run_fixture(_same_named_claims(reference_dir, ["device-2", "device-1"], order))
    assert (swapped != "") == (order == "exact"), swapped
