"""Prepare/unprepare on a node with fake GPUs: CDI, checkpoint, idempotency, MIG, refusals."""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
from pathlib import Path

import pytest

from driver.api import naming
from driver.inventory import discover
from driver.nvml import open_backend
from driver.nvml.profile import parse_profile
from driver.nvml.interface import Placement
from driver.plugin.checkpoint import CheckpointStore, MigInstance, PreparedClaim, PreparedDevice
from driver.plugin.prepare import ClaimRef, DeviceState
from tests.support.claims import allocated_claim

NODE = "node-a"


def _profile(groups):
    return parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                          "nodes": [{"name": NODE, "gpus": groups}]})


@pytest.fixture
def node(tmp_path):
    backend = open_backend("fake", profile=_profile([{"model": "H100-SXM5-80GB", "count": 2},
                                                     {"model": "A100-SXM4-40GB", "count": 1}]),
                           node_name=NODE, state_dir=tmp_path / "nvml")
    backend.init()
    inv = discover(backend, NODE)

    def make_state():
        return DeviceState(driver_name="gpu.partita.dev", node_name=NODE, backend=backend, inventory=inv,
                           cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "plugin", cdi_search_dirs=[])
    return make_state(), backend, inv, make_state


def _names(inv):
    return [naming.gpu_device_name(g.uuid) for g in inv.gpus]


def _prepare(state, *claims):
    refs = [(ClaimRef(c["metadata"]["namespace"], c["metadata"]["name"], c["metadata"]["uid"]), c) for c in claims]
    return asyncio.run(state.prepare(refs))


def _unprepare(state, *claims):
    return asyncio.run(state.unprepare([ClaimRef(c["metadata"]["namespace"], c["metadata"]["name"],
                                                 c["metadata"]["uid"]) for c in claims]))


def test_whole_gpu_prepare_writes_a_valid_cdi_spec_and_checkpoint(node, tmp_path, cdi_validator) -> None:
    state, _, inv, _ = node
    gpu = _names(inv)[0]
    claim = allocated_claim("c1", [gpu], request="gpu/h100")
    res = _prepare(state, claim)[claim["metadata"]["uid"]]
    assert res.error == ""
    (d,) = res.devices
    assert d.request_names == ["gpu"] and d.pool == NODE and d.device == gpu
    uid = claim["metadata"]["uid"]
    assert d.cdi_device_ids == [f"k8s.gpu.partita.dev/gpu={uid}-{gpu}"]
    spec_file = tmp_path / "cdi" / f"k8s.gpu.partita.dev-gpu_{uid}.json"
    spec = json.loads(spec_file.read_text())
    assert list(cdi_validator.iter_errors(spec)) == []
    assert spec["kind"] == "k8s.gpu.partita.dev/gpu"
    assert spec["cdiVersion"] == ("0.5.0" if uid[0].isdigit() else "0.3.0")
    env = spec["devices"][0]["containerEdits"]["env"]
    assert f"NVIDIA_VISIBLE_DEVICES={inv.gpus[0].uuid}" in env
    cp = CheckpointStore(tmp_path / "plugin" / "checkpoint.json").read()
    assert cp.claims[uid].state == "Prepared" and cp.claims[uid].devices[0].device == gpu


def test_prepare_is_idempotent_and_survives_a_restart_and_a_lost_cdi_dir(node, tmp_path) -> None:
    state, _, inv, make_state = node
    claim = allocated_claim("c1", [_names(inv)[0]])
    uid = claim["metadata"]["uid"]
    first = _prepare(state, claim)[uid].devices
    assert _prepare(state, claim)[uid].devices == first
    restarted = make_state()                      # a new plugin process reading the checkpoint
    spec = tmp_path / "cdi" / f"k8s.gpu.partita.dev-gpu_{uid}.json"
    spec.unlink()                                 # /var/run is a tmpfs: a reboot loses the spec
    assert _prepare(restarted, claim)[uid].devices == first
    assert spec.exists()
    assert _unprepare(restarted, claim) == {uid: ""}
    assert not spec.exists()
    assert _unprepare(restarted, claim) == {uid: ""}   # unknown now: success


def test_bad_claims_name_the_problem(node) -> None:
    state, _, inv, _ = node
    gpu = _names(inv)[0]
    other_node = allocated_claim("c2", [gpu], node="node-b")
    res = _prepare(state, other_node)[other_node["metadata"]["uid"]]
    assert "allocated for node(s) ['node-b']" in res.error and "not this node node-a" in res.error
    unknown = allocated_claim("c3", ["gpu-deadbeef"])
    assert "does not publish" in _prepare(state, unknown)[unknown["metadata"]["uid"]].error
    not_alloc = allocated_claim("c4", [gpu])
    del not_alloc["status"]
    assert "has no status.allocation" in _prepare(state, not_alloc)[not_alloc["metadata"]["uid"]].error
    replaced = allocated_claim("c5", [gpu])
    ref = ClaimRef("default", "c5", "uid-the-kubelet-knows")
    res = asyncio.run(state.prepare([(ref, replaced)]))["uid-the-kubelet-knows"]
    assert "was deleted and re-created" in res.error
    empty = asyncio.run(state.prepare([(ClaimRef("default", "c6", ""), replaced)]))[""]
    assert "empty uid" in empty.error
    assert state.prepared_claims() == {}          # nothing half-done anywhere


def test_other_drivers_results_are_ignored(node) -> None:
    state, _, inv, _ = node
    claim = allocated_claim("c1", [_names(inv)[0]], extra_results=[
        {"request": "nic", "driver": "net.example.com", "pool": "elsewhere", "device": "eth0"}])
    res = _prepare(state, claim)[claim["metadata"]["uid"]]
    assert res.error == "" and [d.device for d in res.devices] == [_names(inv)[0]]


def test_a_device_is_not_prepared_for_two_claims_unless_shared(node) -> None:
    state, _, inv, _ = node
    gpu = _names(inv)[0]
    a, b = allocated_claim("a", [gpu]), allocated_claim("b", [gpu])
    assert _prepare(state, a)[a["metadata"]["uid"]].error == ""
    err = _prepare(state, b)[b["metadata"]["uid"]].error
    assert "already prepared for claim default/a" in err
    shared = naming.shared_device_name(_names(inv)[1])
    s1 = allocated_claim("s1", [shared], share_ids={shared: "11111111-1111-1111-1111-111111111111"})
    s2 = allocated_claim("s2", [shared], share_ids={shared: "22222222-2222-2222-2222-222222222222"})
    r = _prepare(state, s1, s2)
    assert r[s1["metadata"]["uid"]].error == "" and r[s2["metadata"]["uid"]].error == ""
    ids = {r[c["metadata"]["uid"]].devices[0].cdi_device_ids[0] for c in (s1, s2)}
    assert len(ids) == 2   # one CDI device per share


def test_corrupt_or_unknown_checkpoint_refuses_work_but_loses_nothing(node, tmp_path) -> None:
    state, _, inv, _ = node
    claim = allocated_claim("c1", [_names(inv)[0]])
    _prepare(state, claim)
    path = tmp_path / "plugin" / "checkpoint.json"
    good = path.read_text()
    path.write_text(good.replace("gpu.partita.dev/v1", "gpu.partita.dev/v9"))
    res = _prepare(state, allocated_claim("c2", [_names(inv)[1]]))
    (err,) = [r.error for r in res.values()]
    assert str(path) in err and "v9" in err and "will not prepare or unprepare" in err
    assert "gpu.partita.dev/v9" in path.read_text()          # untouched
    path.write_text("{truncated")
    assert "not valid JSON" in _unprepare(state, claim)[claim["metadata"]["uid"]]
    assert path.read_text() == "{truncated"
    path.write_text(good)                                    # repaired: the prepared claim is still there
    assert _unprepare(state, claim) == {claim["metadata"]["uid"]: ""}


def test_mig_prepare_creates_the_instance_and_unprepare_returns_the_gpu_to_whole_use(node, tmp_path) -> None:
    state, backend, inv, _ = node
    gpu = inv.gpus[0]
    name = naming.mig_device_name(_names(inv)[0], "3g.40gb", 4)
    claim = allocated_claim("m1", [name], request="mig")
    res = _prepare(state, claim)[claim["metadata"]["uid"]]
    assert res.error == ""
    h = backend.device_by_uuid(gpu.uuid)
    (mig,) = backend.mig_devices(h)
    assert mig.profile_name == "3g.40gb" and mig.placement.start == 4
    assert res.devices[0].mig.uuid == mig.uuid
    spec = json.loads(Path(res.devices[0].cdi_device_ids and
                           (tmp_path / "cdi" / f"k8s.gpu.partita.dev-gpu_{claim['metadata']['uid']}.json")).read_text())
    assert f"NVIDIA_VISIBLE_DEVICES={mig.uuid}" in spec["devices"][0]["containerEdits"]["env"]
    assert _unprepare(state, claim) == {claim["metadata"]["uid"]: ""}
    assert backend.gpu_instances(h) == [] and backend.mig_mode(h).current is False


def test_failed_mig_prepare_leaves_the_node_as_it_was(node) -> None:
    state, backend, inv, _ = node
    a100 = _names(inv)[2]     # Ampere with MIG off: cannot enable without a reset
    claim = allocated_claim("m1", [naming.mig_device_name(a100, "1g.5gb", 0)])
    err = _prepare(state, claim)[claim["metadata"]["uid"]].error
    assert "applies it only after a GPU reset" in err
    h = backend.device_by_uuid(inv.gpus[2].uuid)
    assert backend.mig_mode(h).current is False
    assert state.prepared_claims() == {}
    # two MIG devices where the second overlaps: the first is destroyed again
    h100 = _names(inv)[0]
    bad = allocated_claim("m2", [naming.mig_device_name(h100, "3g.40gb", 0), naming.mig_device_name(h100, "4g.40gb", 0)])
    assert "overlaps" in _prepare(state, bad)[bad["metadata"]["uid"]].error
    assert backend.gpu_instances(backend.device_by_uuid(inv.gpus[0].uuid)) == []


def test_recover_undoes_an_interrupted_mig_prepare(node) -> None:
    """A plugin killed after creating a GPU instance but before finishing: the restarted plugin finds
    the claim still Preparing in the checkpoint and destroys what it created."""
    state, backend, inv, make_state = node
    gpu = inv.gpus[1]
    h = backend.device_by_uuid(gpu.uuid)
    backend.set_mig_mode(h, True)
    gi = backend.create_gpu_instance(h, 19, Placement(2, 1))     # what the killed plugin had done
    cp = state.checkpoint.read()
    cp.claims["uid-1"] = PreparedClaim(uid="uid-1", namespace="default", name="m1", state="Preparing", devices=[
        PreparedDevice(requestNames=[], pool=NODE, device="x", cdiDeviceIDs=[], type="mig", gpuUUID=gpu.uuid,
                       mig=MigInstance(gpuUUID=gpu.uuid, profileID=19, placementStart=2, placementSize=1))])
    state.checkpoint.write(cp)
    restarted = make_state()
    assert asyncio.run(restarted.recover()) == ["uid-1"]
    assert backend.gpu_instances(h) == [] and gi not in [g.id for g in backend.gpu_instances(h)]
    assert backend.mig_mode(h).current is False
    assert restarted.prepared_claims() == {}


def test_waiting_for_another_plugin_instance_does_not_block_the_plugin(node, tmp_path) -> None:
    """During a rolling update two plugin instances share the directory lock; the waiting one keeps
    serving (health checks, other RPCs) instead of freezing its event loop."""
    import fcntl

    state, _, inv, _ = node
    claim = allocated_claim("c1", [_names(inv)[0]])
    lock_path = tmp_path / "plugin" / "serialize.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)

    async def scenario():
        with open(lock_path, "a+") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            ref = ClaimRef("default", "c1", claim["metadata"]["uid"])
            task = asyncio.create_task(state.prepare([(ref, claim)]))
            ticks = 0
            for _ in range(10):
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks == 10 and not task.done()      # the loop ran while prepare waited
            fcntl.flock(other, fcntl.LOCK_UN)
        result = await asyncio.wait_for(task, 5)
        assert result[claim["metadata"]["uid"]].error == ""

    asyncio.run(scenario())


# -- admin access (KEP-5018): monitoring claims change nothing on the device ---------------------
def _spec_of(tmp_path, claim) -> dict:
    return json.loads((tmp_path / "cdi" / f"k8s.gpu.partita.dev-gpu_{claim['metadata']['uid']}.json").read_text())


def _env_of(tmp_path, claim) -> list[str]:
    [dev] = _spec_of(tmp_path, claim)["devices"]
    return dev["containerEdits"]["env"]


def test_a_monitoring_claim_on_a_gpu_prepared_whole_is_prepared_and_either_unprepare_leaves_the_other(
        node, tmp_path, cdi_validator) -> None:
    """The Day-2 report: a DCGM-style claim with adminAccess on a GPU already prepared whole for another
    claim was refused at prepare."""
    state, backend, inv, _ = node
    gpu = _names(inv)[0]
    work = allocated_claim("train", [gpu])
    dcgm = allocated_claim("dcgm", [gpu], namespace="monitoring", admin_access=True)
    wuid, auid = work["metadata"]["uid"], dcgm["metadata"]["uid"]
    assert _prepare(state, work)[wuid].error == ""
    work_entry = state.prepared_claims()[wuid].model_dump()
    work_spec = _spec_of(tmp_path, work)
    res = _prepare(state, dcgm)[auid]
    assert res.error == ""
    assert [d.device for d in res.devices] == [gpu] and res.devices[0].admin_access is True
    spec = _spec_of(tmp_path, dcgm)
    assert list(cdi_validator.iter_errors(spec)) == []
    env = _env_of(tmp_path, dcgm)
    assert "PARTITA_ADMIN_ACCESS=true" in env and f"NVIDIA_VISIBLE_DEVICES={inv.gpus[0].uuid}" in env
    assert "PARTITA_ADMIN_ACCESS=true" not in _env_of(tmp_path, work)
    # the other claim's state is untouched
    assert state.prepared_claims()[wuid].model_dump() == work_entry and _spec_of(tmp_path, work) == work_spec
    # unpreparing the monitoring claim leaves the workload intact ...
    assert _unprepare(state, dcgm) == {auid: ""}
    assert state.prepared_claims()[wuid].model_dump() == work_entry and _spec_of(tmp_path, work) == work_spec
    assert _prepare(state, work)[wuid].error == ""                       # still verifiably prepared
    # ... and unpreparing the workload leaves the monitoring claim intact
    assert _prepare(state, dcgm)[auid].error == ""
    admin_entry = state.prepared_claims()[auid].model_dump()
    admin_spec = _spec_of(tmp_path, dcgm)
    assert _unprepare(state, work) == {wuid: ""}
    assert state.prepared_claims()[auid].model_dump() == admin_entry and _spec_of(tmp_path, dcgm) == admin_spec
    assert _prepare(state, dcgm)[auid].error == ""
    # and another workload may now take the GPU the monitoring claim holds
    again = allocated_claim("train-2", [gpu])
    assert _prepare(state, again)[again["metadata"]["uid"]].error == ""


def test_admin_access_to_a_mig_device_uses_the_existing_instance_and_creates_or_destroys_nothing(
        node, tmp_path) -> None:
    state, backend, inv, _ = node
    h = backend.device_by_uuid(inv.gpus[0].uuid)
    name = naming.mig_device_name(_names(inv)[0], "3g.40gb", 4)
    dcgm = allocated_claim("dcgm", [name], admin_access=True)
    auid = dcgm["metadata"]["uid"]
    # no instance there: refused naming the device, and MIG mode was not even enabled
    err = _prepare(state, dcgm)[auid].error
    assert f"admin access to MIG device {name} needs that MIG device to exist" in err
    assert backend.mig_mode(h).current is False and backend.gpu_instances(h) == []
    assert state.prepared_claims() == {}
    work = allocated_claim("infer", [name])
    assert _prepare(state, work)[work["metadata"]["uid"]].error == ""
    (instance,) = backend.mig_devices(h)
    res = _prepare(state, dcgm)[auid]
    assert res.error == ""
    (d,) = res.devices
    assert d.admin_access is True and d.mig.uuid == instance.uuid and d.mig.created is False
    assert f"NVIDIA_VISIBLE_DEVICES={instance.uuid}" in _env_of(tmp_path, dcgm)
    assert backend.mig_devices(h) == [instance]                           # nothing created
    # an admin claim on the whole GPU leaves its MIG mode and instances alone (Hopper: no leaving MIG mode)
    whole = allocated_claim("dcgm-gpu", [_names(inv)[0]], admin_access=True)
    assert _prepare(state, whole)[whole["metadata"]["uid"]].error == ""
    assert backend.mig_mode(h).current is True and backend.mig_devices(h) == [instance]
    assert _unprepare(state, dcgm, whole) == {auid: "", whole["metadata"]["uid"]: ""}
    assert backend.mig_devices(h) == [instance] and backend.mig_mode(h).current is True    # nothing destroyed
    assert _prepare(state, work)[work["metadata"]["uid"]].error == ""    # the workload's instance verified
    # the workload owns the instance: its unprepare destroys it even while a monitoring claim looks at it,
    # and the monitoring claim then says what is gone instead of creating it again
    assert _prepare(state, dcgm)[auid].error == ""
    assert _unprepare(state, work) == {work["metadata"]["uid"]: ""}
    assert backend.gpu_instances(h) == [] and backend.mig_mode(h).current is False
    err = _prepare(state, dcgm)[auid].error
    assert f"admin access to MIG device {name} needs that MIG device to exist" in err
    assert backend.mig_mode(h).current is False and backend.gpu_instances(h) == []
    assert _unprepare(state, dcgm) == {auid: ""}


def test_admin_access_sets_up_no_sharing_and_its_unprepare_restores_nothing(node, tmp_path) -> None:
    _, backend, inv, _ = node
    state = DeviceState(driver_name="gpu.partita.dev", node_name=NODE, backend=backend, inventory=inv,
                        cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "p", cdi_search_dirs=[])

    def gpu_config(strategy: str, **details) -> list[dict]:
        key = "mpsConfig" if strategy == "MPS" else "timeSlicingConfig"
        return [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": "gpu.partita.dev", "parameters": {
            "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
            "sharing": {"strategy": strategy, key: details}}}}]

    def share(name: str, i: int, config: list[dict], admin: bool = False) -> dict:
        shared = naming.shared_device_name(_names(inv)[i])
        return allocated_claim(name, [shared], share_ids={shared: str(uuidlib.uuid4())}, config=config,
                               admin_access=admin)

    h0, h1 = (backend.device_by_uuid(inv.gpus[i].uuid) for i in (0, 1))
    try:
        # alone on a GPU, a GpuConfig of an admin claim changes nothing (whole or shared device)
        whole = allocated_claim("dcgm-whole", [_names(inv)[0]], config=gpu_config("TimeSlicing", interval="Long"),
                                admin_access=True)
        lone = share("dcgm-share", 0, gpu_config("MPS"), admin=True)
        assert {u: r.error for u, r in _prepare(state, whole, lone).items()} == {
            whole["metadata"]["uid"]: "", lone["metadata"]["uid"]: ""}
        assert backend.time_slice(h0) == "Default" and backend.compute_mode(h0) == "Default"
        assert state.sharing.mps.running_gpus() == []
        env = _env_of(tmp_path, lone)
        assert "PARTITA_ADMIN_ACCESS=true" in env and not any(e.startswith("PARTITA_SHARING_STRATEGY") for e in env)
        # next to an MPS share: no strategy conflict, the daemon stays the workload's
        work = share("mps-work", 1, gpu_config("MPS"))
        assert _prepare(state, work)[work["metadata"]["uid"]].error == ""
        assert state.sharing.mps.running_gpus() == [inv.gpus[1].uuid]
        dcgm = share("dcgm", 1, gpu_config("TimeSlicing", interval="Short"), admin=True)
        assert _prepare(state, dcgm)[dcgm["metadata"]["uid"]].error == ""
        assert backend.time_slice(h1) == "Default" and backend.compute_mode(h1) == "ExclusiveProcess"
        assert _unprepare(state, dcgm) == {dcgm["metadata"]["uid"]: ""}
        assert state.sharing.mps.running_gpus() == [inv.gpus[1].uuid]      # the workload's daemon still runs
        assert backend.compute_mode(h1) == "ExclusiveProcess"
        assert _prepare(state, work)[work["metadata"]["uid"]].error == ""
        # the last workload share restores the defaults even while a monitoring claim stays
        assert _prepare(state, dcgm)[dcgm["metadata"]["uid"]].error == ""
        assert _unprepare(state, work) == {work["metadata"]["uid"]: ""}
        assert state.sharing.mps.running_gpus() == [] and backend.compute_mode(h1) == "Default"
        assert dcgm["metadata"]["uid"] in state.prepared_claims()
    finally:
        for uuid in state.sharing.mps.running_gpus():
            state.sharing.mps.stop(uuid)


def test_recovery_of_an_interrupted_admin_claim_destroys_nothing(node) -> None:
    """A plugin killed while unpreparing a monitoring claim on another claim's MIG device: finishing the
    unprepare leaves the instance (the other claim's) alone."""
    state, backend, inv, make_state = node
    name = naming.mig_device_name(_names(inv)[1], "3g.40gb", 0)
    work = allocated_claim("infer", [name])
    dcgm = allocated_claim("dcgm", [name], admin_access=True)
    assert _prepare(state, work)[work["metadata"]["uid"]].error == ""
    assert _prepare(state, dcgm)[dcgm["metadata"]["uid"]].error == ""
    h = backend.device_by_uuid(inv.gpus[1].uuid)
    (instance,) = backend.mig_devices(h)
    cp = state.checkpoint.read()
    cp.claims[dcgm["metadata"]["uid"]].state = "Unpreparing"
    state.checkpoint.write(cp)
    restarted = make_state()
    assert asyncio.run(restarted.recover()) == [dcgm["metadata"]["uid"]]
    assert backend.mig_devices(h) == [instance]
    assert _prepare(restarted, work)[work["metadata"]["uid"]].error == ""


def test_checkpoint_records_admin_access_and_reads_checkpoints_without_it(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "checkpoint.json")
    old = {"apiVersion": "gpu.partita.dev/v1", "kind": "PluginCheckpoint", "bootID": "b", "claims": {"u1": {
        "uid": "u1", "namespace": "default", "name": "c1", "state": "Prepared", "cdiSpec": "/x", "devices": [{
            "requestNames": ["gpu"], "pool": NODE, "device": "gpu-1", "cdiDeviceIDs": ["k8s.gpu.partita.dev/gpu=u1-gpu-1"],
            "type": "gpu", "gpuUUID": "GPU-1"}]}}}
    (tmp_path / "checkpoint.json").write_text(json.dumps(old))          # written by a plugin before admin access
    cp = store.read()
    assert not cp.claims["u1"].devices[0].admin_access
    cp.claims["u2"] = PreparedClaim(uid="u2", namespace="monitoring", name="dcgm", state="Prepared", devices=[
        PreparedDevice(requestNames=["gpu"], pool=NODE, device="gpu-1", cdiDeviceIDs=["k8s.gpu.partita.dev/gpu=u2-gpu-1"],
                       type="gpu", gpuUUID="GPU-1", adminAccess=True)])
    store.write(cp)
    raw = json.loads((tmp_path / "checkpoint.json").read_text())
    assert "adminAccess" not in raw["claims"]["u1"]["devices"][0]      # an older plugin still reads it
    assert raw["claims"]["u2"]["devices"][0]["adminAccess"] is True
    again = store.read()
    assert again.claims["u2"].devices[0].admin_access is True and not again.claims["u1"].devices[0].admin_access
