"""The conformance runner: its contract (shared/conformance/README.md) and every fixture."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.allocator.conformance", str(directory)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_all_shared_fixtures_pass_in_first_fit(shared_dir) -> None:
    res = _run(shared_dir / "conformance" / "allocator")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[-1] == "10 passed, 0 failed"
    assert all(line.startswith("PASS ") for line in lines[:-1])


def test_partita_fixtures_pass() -> None:
    res = _run(REPO / "tests" / "fixtures" / "allocator")
    assert res.returncode == 0, res.stdout
    assert res.stdout.splitlines()[-1].endswith("passed, 0 failed")


def test_failures_unreadable_and_unsupported_fixtures_are_reported(tmp_path, shared_dir) -> None:
    good = (shared_dir / "conformance" / "allocator" / "01-simple.yaml").read_text()
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
