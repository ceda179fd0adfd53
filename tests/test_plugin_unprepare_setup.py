"""Direct tests of what prepare.py delegates (issue 17 item 3): the unprepare batch
(driver/plugin/unprepare.py) and the per-device set-up and verification (driver/plugin/devicesetup.py)."""

from __future__ import annotations

import asyncio

import pytest

from driver.api import naming
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.checkpoint import CheckpointError
from driver.plugin.prepare import ClaimRef, DeviceState
from driver.plugin.unprepare import unprepare_batch
from tests.support.claims import allocated_claim

NODE = "node-a"
DRIVER = "gpu.partita.dev"


@pytest.fixture
def state(tmp_path):
    backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:2", NODE), node_name=NODE,
                           state_dir=tmp_path / "nvml")
    backend.init()
    (tmp_path / "boot_id").write_text("boot-1\n")
    s = DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=discover(backend, NODE),
                    cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "p", cdi_search_dirs=[],
                    boot_id_file=tmp_path / "boot_id")
    asyncio.run(s.recover())
    return s


def _prepared(state: DeviceState, name: str) -> ClaimRef:
    claim = allocated_claim(name, [naming.gpu_device_name(state.inventory.gpus[0].uuid)])
    ref = ClaimRef(claim["metadata"]["namespace"], name, claim["metadata"]["uid"])
    assert asyncio.run(state.prepare([(ref, claim)]))[ref.uid].error == ""
    return ref


def _no_crash(point: str) -> None:
    pass


def test_unprepare_batch_releases_and_forgets_prepared_claims_and_accepts_unknown_ones(state) -> None:
    ref = _prepared(state, "a")
    spec = state.specs.path(ref.uid)
    assert spec.exists()
    cp = state.checkpoint.read()
    unknown = ClaimRef("default", "never", "uid-never")
    empty = ClaimRef("default", "blank", "")
    out = unprepare_batch(cp, [ref, unknown, empty], checkpoint=state.checkpoint, release=state.release,
                          crash=_no_crash)
    assert out[ref.uid] == "" and out[unknown.uid] == ""
    assert "empty uid" in out[""] and "default/blank" in out[""]
    assert not spec.exists() and state.checkpoint.read().claims == {}


def test_unprepare_batch_whose_intent_cannot_be_recorded_changes_nothing(state, monkeypatch) -> None:
    ref = _prepared(state, "b")
    spec = state.specs.path(ref.uid)
    cp = state.checkpoint.read()

    def refuse(_cp) -> None:  # noqa: ANN001
        raise CheckpointError("checkpoint /x: disk full")
    monkeypatch.setattr(state.checkpoint, "write", refuse)
    out = unprepare_batch(cp, [ref], checkpoint=state.checkpoint, release=state.release, crash=_no_crash)
    assert "nothing was unprepared" in out[ref.uid] and "disk full" in out[ref.uid]
    assert cp.claims[ref.uid].state == "Prepared" and spec.exists()      # nothing released, nothing forgotten
    monkeypatch.undo()
    assert state.checkpoint.read().claims[ref.uid].state == "Prepared"


def test_verify_rewrites_a_missing_cdi_spec_and_keeps_the_device_ids(state) -> None:
    ref = _prepared(state, "c")
    spec = state.specs.path(ref.uid)
    content = spec.read_bytes()
    spec.unlink()
    cp = state.checkpoint.read()
    entry = cp.claims[ref.uid]
    ids = [d.cdi_device_ids for d in entry.devices]
    devices = state.setup.verify(cp, ref, entry)
    assert spec.read_bytes() == content
    assert [d.cdi_device_ids for d in devices] == ids


def test_device_setup_of_a_whole_gpu_names_its_cdi_device_by_claim_and_device(state) -> None:
    ref = _prepared(state, "d")
    [dev] = state.checkpoint.read().claims[ref.uid].devices
    name = naming.gpu_device_name(state.inventory.gpus[0].uuid)
    assert dev.device == name and dev.type == "gpu" and dev.mig is None and dev.edits is None
    assert dev.cdi_device_ids == [f"k8s.{DRIVER}/gpu={ref.uid}-{name}"]
