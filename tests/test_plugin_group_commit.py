"""Group commit of concurrent prepares and unprepares (issue 18): the claims of concurrent calls are
prepared as one batch whose checkpoint is written once, and no claim is answered before that write; a
write that fails fails every claim of the batch and leaves the node as it was. The crash between the
batch's write and its answers is in tests/test_plugin_group_commit_crash.py (a real plugin process)."""

from __future__ import annotations

import asyncio
import errno
import os
import uuid as uuidlib

import pytest

from driver.api import naming
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.nvml.interface import COMPUTE_MODE_DEFAULT
from driver.plugin import durable
from driver.plugin.checkpoint import CheckpointStore
from driver.plugin.prepare import ClaimRef, DeviceState
from tests.support.claims import allocated_claim

NODE = "node-a"
DRIVER = "gpu.partita.dev"
MEDIUM = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Medium"}}
MPS = {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}}


@pytest.fixture
def node(tmp_path):
    backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:3", NODE), node_name=NODE,
                           state_dir=tmp_path / "nvml")
    backend.init()
    inv = discover(backend, NODE)
    state = DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=inv,
                        cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "p", cdi_search_dirs=[],
                        boot_id_file=tmp_path / "boot_id")
    (tmp_path / "boot_id").write_text("boot-1\n")
    yield state, backend, inv
    for uuid in state.sharing.mps.running_gpus():       # never leave a stand-in daemon behind
        state.sharing.mps.stop(uuid)


def _share(name: str, inv, gpu: int, sharing: dict | None = None) -> dict:
    shared = naming.shared_device_name(naming.gpu_device_name(inv.gpus[gpu].uuid))
    config = None if sharing is None else [{"source": "FromClaim", "requests": ["gpu"], "opaque": {
        "driver": DRIVER, "parameters": {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
                                         "sharing": sharing}}}]
    return allocated_claim(name, [shared], share_ids={shared: str(uuidlib.uuid4())}, config=config,
                           share_memory="4Gi")


def _ref(c: dict) -> ClaimRef:
    return ClaimRef(c["metadata"]["namespace"], c["metadata"]["name"], c["metadata"]["uid"])


async def _concurrently(state: DeviceState, method: str, claims: list[dict]) -> list[dict]:
    """One kubelet call per claim, all at once (as many pods starting or stopping together)."""
    if method == "prepare":
        return await asyncio.gather(*(state.prepare([(_ref(c), c)]) for c in claims))
    return await asyncio.gather(*(state.unprepare([_ref(c)]) for c in claims))


def _claims(inv) -> list[dict]:
    """Shares of three GPUs: time-sliced at Medium (the first share sets it), default, and MPS."""
    return [_share(f"ts-{i}", inv, 0, MEDIUM) for i in range(4)] + [_share(f"d-{i}", inv, 1) for i in range(4)] \
        + [_share(f"mps-{i}", inv, 2, MPS) for i in range(2)]


def _node_state(state: DeviceState, backend, inv) -> dict:
    hs = [backend.device_by_uuid(g.uuid) for g in inv.gpus]
    return {"time_slices": [backend.time_slice(h) for h in hs], "compute_modes": [backend.compute_mode(h) for h in hs],
            "mps": state.sharing.mps.running_gpus(),
            "cdi": sorted(p.name for p in state.cdi_root.glob("*")) if state.cdi_root.exists() else [],
            "checkpoint": durable.read_file(state.checkpoint.path)}


def test_concurrent_prepares_are_one_batch_with_one_checkpoint_write_and_unprepares_two(node) -> None:
    state, backend, inv = node
    claims = _claims(inv)
    asyncio.run(state.recover())
    writes = state.checkpoint.writes
    answers = asyncio.run(_concurrently(state, "prepare", claims))
    assert all(not a[c["metadata"]["uid"]].error for a, c in zip(answers, claims)), answers
    assert state.commits.batch_sizes[-1] == len(claims)
    assert state.checkpoint.writes - writes == 1            # one durable record for the whole batch
    on_disk = CheckpointStore(state.checkpoint.path).read().claims
    assert {c["metadata"]["uid"] for c in claims} == {u for u, e in on_disk.items() if e.state == "Prepared"}
    assert backend.time_slice(backend.device_by_uuid(inv.gpus[0].uuid)) == "Medium"
    assert state.sharing.mps.running_gpus() == [inv.gpus[2].uuid]
    # every claim has its own CDI device: names composed from uid, device and share, not parsed back
    for a, c in zip(answers, claims):
        [dev] = a[c["metadata"]["uid"]].devices
        r = c["status"]["allocation"]["devices"]["results"][0]
        assert dev.cdi_device_ids == [f"k8s.{DRIVER}/gpu={c['metadata']['uid']}-{r['device']}-{r['shareID']}"]

    writes = state.checkpoint.writes
    answers = asyncio.run(_concurrently(state, "unprepare", claims))
    assert all(a == {c["metadata"]["uid"]: ""} for a, c in zip(answers, claims)), answers
    assert state.commits.batch_sizes[-1] == len(claims)
    assert state.checkpoint.writes - writes == 2            # the batch's intent, then its removal
    after = _node_state(state, backend, inv)
    assert after["time_slices"] == ["Default"] * 3 and after["compute_modes"] == [COMPUTE_MODE_DEFAULT] * 3
    assert after["mps"] == [] and after["cdi"] == []


def test_the_same_claim_twice_in_a_batch_is_prepared_once(node) -> None:
    state, _, inv = node
    c = _share("twice", inv, 0, MEDIUM)
    a, b = asyncio.run(_concurrently(state, "prepare", [c, c]))
    uid = c["metadata"]["uid"]
    assert a[uid].error == "" and a[uid].devices == b[uid].devices
    assert state.commits.batch_sizes[-1] == 2 and list(state.prepared_claims()) == [uid]


def _failing_checkpoint_fsync(monkeypatch, state: DeviceState) -> list[str]:
    """fsync fails (EIO) for the checkpoint's temp files only, as a failing disk would; returns the files."""
    real = os.fsync
    failed: list[str] = []

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(target).startswith(f".{state.checkpoint.path.name}."):
            failed.append(target)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def test_a_failed_batch_write_fails_every_claim_and_leaves_the_node_as_it_was(node, monkeypatch) -> None:
    state, backend, inv = node
    keep = _share("keep", inv, 1)                           # prepared before: must stay as it is
    assert asyncio.run(state.prepare([(_ref(keep), keep)]))[keep["metadata"]["uid"]].error == ""
    before = _node_state(state, backend, inv)
    claims = _claims(inv)
    failed = _failing_checkpoint_fsync(monkeypatch, state)
    answers = asyncio.run(_concurrently(state, "prepare", claims))
    assert failed, "the batch never wrote the checkpoint"
    assert state.commits.batch_sizes[-1] == len(claims)
    for a, c in zip(answers, claims):
        err = a[c["metadata"]["uid"]].error
        assert err.startswith(f"claim default/{c['metadata']['name']}: nothing was prepared: cannot write checkpoint")
        assert "input/output error" in err.lower() and "the kubelet retries" in err
        assert a[c["metadata"]["uid"]].devices == []
    # the node as it was: no CDI spec, time-slice and compute modes back, no MPS daemon, checkpoint unchanged
    assert _node_state(state, backend, inv) == before
    assert not list(state.checkpoint.path.parent.glob(".checkpoint.json.*.tmp"))

    monkeypatch.undo()                                      # the disk is back: the kubelet's retry succeeds
    answers = asyncio.run(_concurrently(state, "prepare", claims))
    assert all(not a[c["metadata"]["uid"]].error for a, c in zip(answers, claims)), answers
    assert asyncio.run(state.unprepare([_ref(c) for c in claims + [keep]])) == \
        {c["metadata"]["uid"]: "" for c in claims + [keep]}


def test_a_failed_batch_write_after_a_mig_intent_undoes_the_mig_device_too(node, monkeypatch) -> None:
    """A MIG claim writes its intent mid-batch (recording the batch's earlier claims ``Preparing``); when the
    batch's own write then fails, its MIG device is destroyed and nothing stays recorded."""
    state, backend, inv = node
    claims = _claims(inv)[:4]
    mig = allocated_claim("mig", [naming.mig_device_name(naming.gpu_device_name(inv.gpus[1].uuid), "1g.10gb", 0)])
    h = backend.device_by_uuid(inv.gpus[1].uuid)
    real_write = state.checkpoint.write
    calls = {"n": 0}

    def write(cp):            # the MIG claim's intent and instance records succeed; the batch's write fails
        calls["n"] += 1
        if all(c.state == "Prepared" for c in cp.claims.values()) and cp.claims:
            raise __import__("driver.plugin.checkpoint", fromlist=["CheckpointError"]).CheckpointError(
                "cannot write checkpoint: disk failed")
        real_write(cp)
    monkeypatch.setattr(state.checkpoint, "write", write)
    answers = asyncio.run(_concurrently(state, "prepare", claims + [mig]))
    assert calls["n"] >= 4, calls        # intent, GPU instance, MIG device, then the batch's write
    for a, c in zip(answers, claims + [mig]):
        assert "nothing was prepared: cannot write checkpoint: disk failed" in a[c["metadata"]["uid"]].error
    assert backend.gpu_instances(h) == [] and backend.mig_mode(h).current is False
    assert state.prepared_claims() == {}                    # the rollback's write removed the intents
    assert not list(state.cdi_root.glob("*"))
    assert backend.time_slice(backend.device_by_uuid(inv.gpus[0].uuid)) == "Default"
