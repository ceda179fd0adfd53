"""Bounded handover chaos (hack/chaos_handover.py): two real controller processes against the API server
process, leader paused/killed/stopped and API faults injected, every state checked by the independent
validity checker. Must report 0 violations and 0 leaked allocations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(170)


@pytest.mark.parametrize("seed", [11, 23])
def test_handover_chaos_reports_no_violations(seed: int, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "chaos_handover.py"), "--seed", str(seed), "--rounds", "3",
         "--json", str(out), "--keep-logs", str(tmp_path / "logs")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=160)
    assert out.exists(), f"no figures; stderr:\n{proc.stderr[-3000:]}"
    fig = json.loads(out.read_text())
    assert fig["violations"] == [] and fig["leaks"] == [], (fig, proc.stderr[-3000:])
    assert fig["double_allocations_logged"] == 0, fig      # no controller ever saw a device held twice
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run did what it is for: pods came and went, and the lease changed hands (3 rounds take 3 of the
    # 5 actions, so at least one of kill, term and pause-long)
    assert fig["rounds"] == 3 and fig["claims_allocated"] >= 5 and fig["pods_bound"] >= 5, fig
    assert fig["samples_checked"] >= 10, fig
    assert fig["lease_transitions"] >= 1, fig
