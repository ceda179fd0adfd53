"""The plugin enforces the device model itself, whatever a claim's allocation says (issue: device model
not enforced at prepare): one use per GPU across whole / MIG / shared, MIG placements that do not
overlap, shareIDs that are unique UUIDs, shares that fit the GPU's memory, allocations for this node
(by name and by labels). Every refusal names both claims and the device, and changes nothing."""

from __future__ import annotations

import asyncio

import pytest

from driver.api import naming
from driver.inventory import discover
from driver.nvml import open_backend
from driver.nvml.profile import parse_profile
from driver.plugin.prepare import ClaimRef, DeviceState
from tests.support.claims import allocated_claim

NODE = "node-a"
S1 = "11111111-1111-4111-8111-111111111111"
S2 = "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def node(tmp_path):
    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                             "nodes": [{"name": NODE, "gpus": [{"model": "H100-SXM5-80GB", "count": 2},
                                                               {"model": "L4", "count": 1}]}]})
    backend = open_backend("fake", profile=profile, node_name=NODE, state_dir=tmp_path / "nvml")
    backend.init()
    inv = discover(backend, NODE)
    state = DeviceState(driver_name="gpu.partita.dev", node_name=NODE, backend=backend, inventory=inv,
                        cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "p", cdi_search_dirs=[],
                        node_labels={"kubernetes.io/hostname": NODE, "zone": "a", "gpus": "3"})
    yield state, backend, inv, tmp_path
    for uuid in state.sharing.mps.running_gpus():
        state.sharing.mps.stop(uuid)


def _gpu(inv, i: int) -> str:
    return naming.gpu_device_name(inv.gpus[i].uuid)


def _mig(inv, i: int, profile: str, start: int) -> str:
    return naming.mig_device_name(_gpu(inv, i), profile, start)


def _shared(inv, i: int) -> str:
    return naming.shared_device_name(_gpu(inv, i))


def _share(name: str, inv, i: int, share_id: str, memory: str = "10Gi") -> dict:
    return allocated_claim(name, [_shared(inv, i)], share_ids={_shared(inv, i): share_id}, share_memory=memory)


def _prepare(state, claim) -> str:
    ref = ClaimRef(claim["metadata"]["namespace"], claim["metadata"]["name"], claim["metadata"]["uid"])
    return asyncio.run(state.prepare([(ref, claim)]))[ref.uid].error


def _ok(state, claim) -> None:
    assert _prepare(state, claim) == ""


def _refused(state, claim, *, other: str, device: str, why: str) -> str:
    """Refused naming both claims and the device; nothing of the claim is left on the node."""
    err = _prepare(state, claim)
    assert err, f"claim {claim['metadata']['name']} was prepared"
    assert f"claim default/{claim['metadata']['name']}" in err and f"claim default/{other}" in err, err
    assert device in err and why in err, err
    assert claim["metadata"]["uid"] not in state.prepared_claims()
    return err


def _untouched(backend, inv, i: int) -> None:
    h = backend.device_by_uuid(inv.gpus[i].uuid)
    if inv.gpus[i].mig_capable:
        assert backend.mig_mode(h).current is False and backend.gpu_instances(h) == []
    assert backend.compute_mode(h) == "Default" and backend.time_slice(h) == "Default"


def test_a_gpu_prepared_whole_refuses_mig_and_shares_of_another_claim(node) -> None:
    state, backend, inv, _ = node
    _ok(state, allocated_claim("whole", [_gpu(inv, 0)]))
    mig = allocated_claim("mig", [_mig(inv, 0, "1g.10gb", 0)])
    _refused(state, mig, other="whole", device=_gpu(inv, 0), why="cannot be prepared")
    _untouched(backend, inv, 0)          # MIG mode was not enabled, no instance created
    share = _share("share", inv, 0, S1)
    _refused(state, share, other="whole", device=_shared(inv, 0), why="cannot be prepared")
    _untouched(backend, inv, 0)


def test_mig_or_shares_on_a_gpu_refuse_it_whole_and_each_other(node) -> None:
    state, backend, inv, _ = node
    _ok(state, _share("share", inv, 0, S1))
    _refused(state, allocated_claim("whole", [_gpu(inv, 0)]), other="share", device=_gpu(inv, 0),
             why="the same GPU in another use")
    _refused(state, allocated_claim("mig", [_mig(inv, 0, "3g.40gb", 4)]), other="share",
             device=_mig(inv, 0, "3g.40gb", 4), why="the same GPU in another use")
    _ok(state, allocated_claim("mig-1", [_mig(inv, 1, "3g.40gb", 4)]))
    _refused(state, allocated_claim("whole-1", [_gpu(inv, 1)]), other="mig-1", device=_gpu(inv, 1),
             why="the same GPU in another use")
    _refused(state, _share("share-1", inv, 1, S2), other="mig-1", device=_shared(inv, 1),
             why="the same GPU in another use")


def test_mig_placements_of_two_claims_must_not_overlap(node) -> None:
    state, backend, inv, _ = node
    _ok(state, allocated_claim("big", [_mig(inv, 0, "3g.40gb", 4)]))          # memory slices 4-7
    err = _refused(state, allocated_claim("small", [_mig(inv, 0, "1g.10gb", 5)]), other="big",
                   device=_mig(inv, 0, "3g.40gb", 4), why="overlaps")
    assert "memory slices 4-7" in err and "memory slices 5-5" in err
    _ok(state, allocated_claim("beside", [_mig(inv, 0, "1g.10gb", 3)]))       # slice 3: free
    # one claim overlapping itself is refused before anything is created
    self_overlap = allocated_claim("self", [_mig(inv, 1, "3g.40gb", 0), _mig(inv, 1, "4g.40gb", 0)])
    assert "overlaps" in _prepare(state, self_overlap) and "is also in this claim's allocation" in _prepare(
        state, self_overlap)
    _untouched(backend, inv, 1)


def test_a_gpu_offers_at_most_max_instances_of_a_profile(node) -> None:
    state, _, inv, _ = node
    _ok(state, allocated_claim("me-a", [_mig(inv, 0, "1g.10gb+me", 0)]))     # 1g.10gb+me: one per GPU
    _refused(state, allocated_claim("me-b", [_mig(inv, 0, "1g.10gb+me", 2)]), other="me-a",
             device="1g.10gb+me", why="at most 1 MIG device(s)")


def test_shares_must_fit_the_gpus_published_memory(node) -> None:
    state, backend, inv, _ = node
    l4 = inv.gpus[2]                                              # 23034Mi (about 22.5Gi)
    err = _prepare(state, _share("huge", inv, 2, S1, memory="1000Gi"))
    assert "consume 1000Gi" in err and "published capacity 23034Mi" in err and _shared(inv, 2) in err
    _untouched(backend, inv, 2)
    _ok(state, _share("a", inv, 2, S1, memory="12Gi"))
    _refused(state, _share("b", inv, 2, S2, memory="11Gi"), other="a", device=_shared(inv, 2),
             why="more than the shared device's published capacity")
    _ok(state, _share("c", inv, 2, S2, memory=f"{l4.memory_bytes // (1 << 20) - 12 * 1024}Mi"))   # exactly full


def test_a_share_id_is_used_once_and_must_be_a_uuid(node, tmp_path) -> None:
    state, _, inv, _ = node
    _ok(state, _share("first", inv, 0, S1))
    _refused(state, _share("second", inv, 0, S1), other="first", device=_shared(inv, 0), why="the same shareID")
    for bad in ("x/../y z", "AAAAAAAA-BBBB-4CCC-8DDD-EEEEEEEEEEEE", "", "2222222222224222822222222222222"):
        claim = _share("bad", inv, 1, bad)
        err = _prepare(state, claim)
        assert "claim default/bad" in err and _shared(inv, 1) in err, err
        assert ("is not a UUID" if bad else "has no shareID") in err
        assert not list((tmp_path / "cdi").glob(f"*{claim['metadata']['uid']}*"))   # no CDI spec written
    # shareIDs belong to shared devices only; a dedicated device with one is refused
    forged = allocated_claim("forged", [_gpu(inv, 1)], share_ids={_gpu(inv, 1): S2})
    assert "dedicated gpu device but the result carries shareID" in _prepare(state, forged)


def test_one_claim_cannot_use_a_gpu_whole_and_shared(node) -> None:
    state, backend, inv, _ = node
    both = allocated_claim("both", [_gpu(inv, 0), _shared(inv, 0)], share_ids={_shared(inv, 0): S1})
    err = _prepare(state, both)
    assert "whole GPU" in err and "is also in this claim's allocation" in err
    _untouched(backend, inv, 0)


def _with_selector(claim: dict, terms: list[dict]) -> dict:
    claim["status"]["allocation"]["nodeSelector"] = {"nodeSelectorTerms": terms}
    return claim


def test_a_label_node_selector_must_select_this_node(node) -> None:
    state, _, inv, _ = node
    other = _with_selector(allocated_claim("elsewhere", [_gpu(inv, 0)]), [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-b"]}]}])
    err = _prepare(state, other)
    assert "claim default/elsewhere" in err and "does not select this node node-a" in err
    assert "label kubernetes.io/hostname='node-a' is not In ['node-b']" in err
    gt = _with_selector(allocated_claim("gt", [_gpu(inv, 0)]), [
        {"matchExpressions": [{"key": "gpus", "operator": "Gt", "values": ["3"]}]},
        {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}])
    err = _prepare(state, gt)
    assert "term 0: label gpus='3' is not > 3" in err and "term 1: label zone='a' is In ['a']" in err
    both = _with_selector(allocated_claim("fields-and-labels", [_gpu(inv, 0)]), [
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}],
         "matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}])
    assert "label zone='a' is not In ['b']" in _prepare(state, both)
    assert state.prepared_claims() == {}
    here = _with_selector(allocated_claim("here", [_gpu(inv, 0)]), [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["node-b"]}]},
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]},
                              {"key": "gpus", "operator": "Lt", "values": ["4"]},
                              {"key": "spot", "operator": "DoesNotExist"}],
         "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}]}])
    _ok(state, here)


def test_label_selectors_are_refused_while_the_node_labels_are_unknown(node) -> None:
    state, _, inv, _ = node
    state.node_labels = None
    claim = _with_selector(allocated_claim("zonal", [_gpu(inv, 0)]), [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}])
    assert "could not read from the API server" in _prepare(state, claim)
    _ok(state, allocated_claim("by-name", [_gpu(inv, 1)]))          # name-only selectors need no labels


def test_an_empty_or_malformed_selector_selects_nothing(node) -> None:
    state, _, inv, _ = node
    for terms, why in (([], "no nodeSelectorTerms"), ([{}], "no requirements"),
                       ([{"matchFields": [{"key": "metadata.uid", "operator": "In", "values": ["x"]}]}],
                        "not supported"),
                       ([{"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}],
                        "operator 'Near'"),
                       (["zone=a"], "term 0: malformed"),
                       ([{"matchFields": ["metadata.name"]}], "term 0: malformed")):
        err = _prepare(state, _with_selector(allocated_claim("odd", [_gpu(inv, 0)]), terms))
        assert "does not select this node node-a" in err and why in err, err


def test_a_gpu_stuck_in_mig_mode_is_not_prepared_whole_or_shared(tmp_path) -> None:
    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": NODE, "gpus": [{"model": "A100-SXM4-40GB", "count": 1, "migEnabled": True}]}]})
    backend = open_backend("fake", profile=profile, node_name=NODE, state_dir=tmp_path / "nvml")
    backend.init()
    inv = discover(backend, NODE)
    state = DeviceState(driver_name="gpu.partita.dev", node_name=NODE, backend=backend, inventory=inv,
                        cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "p", cdi_search_dirs=[])
    for claim in (allocated_claim("whole", [_gpu(inv, 0)]), _share("share", inv, 0, S1)):
        err = _prepare(state, claim)
        assert "is in MIG mode, which it leaves only with a GPU reset" in err and "claim default/" in err
    _ok(state, allocated_claim("mig", [_mig(inv, 0, "1g.5gb", 0)]))


# -- admin access (KEP-5018): monitoring claims are never a use -----------------------------------
def _admin(name: str, devices: list[str], **kw) -> dict:
    return allocated_claim(name, devices, admin_access=True, **kw)


def test_admin_access_is_prepared_on_gpus_in_use_whole_mig_or_shared(node) -> None:
    """The Day-2 report: a DCGM-style claim with adminAccess on a GPU already in use was refused."""
    state, backend, inv, _ = node
    _ok(state, allocated_claim("whole", [_gpu(inv, 0)]))
    _ok(state, _admin("dcgm-whole", [_gpu(inv, 0)]))                        # the same device, whole
    _ok(state, _admin("dcgm-shared", [_shared(inv, 0)], share_ids={_shared(inv, 0): S1}))   # another use of it
    _ok(state, allocated_claim("mig", [_mig(inv, 1, "3g.40gb", 4)]))
    _ok(state, _admin("dcgm-mig", [_mig(inv, 1, "3g.40gb", 4)]))            # the MIG device in use
    _ok(state, _admin("dcgm-gpu1", [_gpu(inv, 1)]))                         # the whole GPU under MIG use
    _ok(state, _share("share", inv, 2, S1, memory="20Gi"))
    # an admin share consumes nothing: 20Gi + 20Gi would exceed the L4's 22.5Gi
    _ok(state, _admin("dcgm-l4", [_shared(inv, 2)], share_ids={_shared(inv, 2): S2}, share_memory="20Gi"))
    cp = state.checkpoint.read()
    admins = {c.name: [d.admin_access for d in c.devices] for c in cp.claims.values()}
    assert admins == {"whole": [None], "mig": [None], "share": [None], "dcgm-whole": [True],
                      "dcgm-shared": [True], "dcgm-mig": [True], "dcgm-gpu1": [True], "dcgm-l4": [True]}


def test_workload_claims_are_prepared_on_devices_an_admin_claim_holds(node) -> None:
    state, backend, inv, _ = node
    _ok(state, _admin("dcgm-0", [_gpu(inv, 0)]))
    _ok(state, _admin("dcgm-1", [_gpu(inv, 1), _shared(inv, 1)], share_ids={_shared(inv, 1): S1}))
    _ok(state, allocated_claim("whole", [_gpu(inv, 0)]))
    _ok(state, allocated_claim("mig", [_mig(inv, 1, "3g.40gb", 4)]))      # MIG next to admin whole + shared
    _ok(state, _admin("dcgm-l4", [_shared(inv, 2)], share_ids={_shared(inv, 2): S1}, share_memory="22Gi"))
    _ok(state, _share("share", inv, 2, S1, memory="22Gi"))                  # even the admin's shareID
    # the device model still holds between workload claims, whatever admin claims there are
    _refused(state, allocated_claim("whole-2", [_gpu(inv, 0)]), other="whole", device=_gpu(inv, 0),
             why="(the same device)")
    _refused(state, allocated_claim("whole-1", [_gpu(inv, 1)]), other="mig", device=_gpu(inv, 1),
             why="the same GPU in another use")


def test_an_admin_result_is_still_checked_for_its_shape(node) -> None:
    state, backend, inv, _ = node
    bad = _admin("dcgm", [_shared(inv, 0)], share_ids={_shared(inv, 0): "x/../y"})
    err = _prepare(state, bad)
    assert "claim default/dcgm" in err and _shared(inv, 0) in err and "is not a UUID" in err
    forged = _admin("forged", [_gpu(inv, 0)], share_ids={_gpu(inv, 0): S1})
    assert "dedicated gpu device but the result carries shareID" in _prepare(state, forged)
    assert state.prepared_claims() == {}
    _untouched(backend, inv, 0)


def test_an_admin_result_twice_in_one_claim_is_refused(node, tmp_path) -> None:
    """Each result is one CDI device named after the claim and the device: the same device twice (a
    forged allocation; the allocator never gives an admin request a device of its own claim) is refused."""
    state, backend, inv, _ = node
    twice = _admin("dcgm", [_gpu(inv, 0), _gpu(inv, 0)])
    err = _prepare(state, twice)
    assert "claim default/dcgm" in err and f"names device {_gpu(inv, 0)} twice" in err, err
    mixed = allocated_claim("mixed", [_gpu(inv, 1)], extra_results=[
        {"request": "gpu", "driver": "gpu.partita.dev", "pool": NODE, "device": _gpu(inv, 1), "adminAccess": True}])
    assert f"names device {_gpu(inv, 1)} twice" in _prepare(state, mixed)
    assert state.prepared_claims() == {} and not list((tmp_path / "cdi").glob("*.json"))
