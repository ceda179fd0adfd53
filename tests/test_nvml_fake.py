"""The fake NVML behaves like hardware: identity, MIG rules and refusals, persistence."""

from __future__ import annotations

import pytest

from driver.nvml import errors, open_backend, profile_from_spec
from driver.nvml.fake import FakeNvml
from driver.nvml.interface import Placement
from driver.nvml.profile import parse_profile


def _fake(spec: str = "H100-SXM5-80GB:2", node: str = "node-a", state_dir=None, mig: bool = False) -> FakeNvml:
    if mig:
        model, _, count = spec.partition(":")
        profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                                 "nodes": [{"name": "*", "gpus": [{"model": model, "count": int(count or 1),
                                                                   "migEnabled": True}]}]})
    else:
        profile = profile_from_spec(spec)
    b = open_backend("fake", profile=profile, node_name=node, state_dir=state_dir)
    b.init()
    assert isinstance(b, FakeNvml)
    return b


def test_uninitialized_calls_are_refused() -> None:
    b = open_backend("fake", profile=profile_from_spec("T4:1"), node_name="n")
    with pytest.raises(errors.UninitializedError):
        b.device_count()


def test_uuids_are_stable_per_node_and_slot_and_differ_across_nodes() -> None:
    a1 = [_fake(node="node-a").device_info(i).uuid for i in range(2)]
    a2 = [_fake(node="node-a").device_info(i).uuid for i in range(2)]
    b = [_fake(node="node-b").device_info(i).uuid for i in range(2)]
    assert a1 == a2
    assert len(set(a1 + b)) == 4
    assert all(u.startswith("GPU-") and len(u) == 40 for u in a1)


def test_device_facts_come_from_the_model_table() -> None:
    b = _fake("H100-SXM5-80GB:1")
    info = b.device_info(0)
    assert info.name == "NVIDIA H100 80GB HBM3"
    assert info.memory_total_bytes == 81559 * 2**20
    assert info.multiprocessors == 132 and info.cuda_compute_capability == "9.0"
    assert info.architecture == "Hopper" and info.brand == "NVIDIA" and info.pci_device_id == "0x233010DE"
    assert info.pci_bus_id == "0000:1b:00.0" and info.numa_node == 0 and info.pcie_root == "pci0000:15"
    assert b.device_by_uuid(info.uuid) == 0
    with pytest.raises(errors.NotFoundError):
        b.device_by_uuid("GPU-00000000-0000-0000-0000-000000000000")


def test_hgx_layout_spreads_gpus_over_two_numa_nodes() -> None:
    b = _fake("H100-SXM5-80GB:8")
    numa = [b.device_info(i).numa_node for i in range(8)]
    buses = {b.device_info(i).pci_bus_id for i in range(8)}
    assert numa == [0, 0, 0, 0, 1, 1, 1, 1] and len(buses) == 8


def test_profile_info_uses_real_profile_ids_not_constant_indexes() -> None:
    b = _fake()
    assert b.gpu_instance_profile_info(0, 0).id == 19          # 1_SLICE -> 1g.10gb id 19
    assert b.gpu_instance_profile_info(0, 9).id == 15          # 1_SLICE_REV2 -> 1g.20gb id 15
    assert b.gpu_instance_profile_info(0, 4).id == 0           # 7_SLICE -> 7g.80gb id 0
    assert b.gpu_instance_possible_placements(0, 15) == [Placement(s, 2) for s in (0, 2, 4, 6)]
    with pytest.raises(errors.NotSupportedError):
        b.gpu_instance_profile_info(0, 5)                       # 8_SLICE: not on H100


def test_mig_calls_on_non_mig_gpus_are_not_supported() -> None:
    b = _fake("L4:1")
    for call in (lambda: b.mig_mode(0), lambda: b.set_mig_mode(0, True), lambda: b.gpu_instances(0),
                 lambda: b.gpu_instance_profile_info(0, 0)):
        with pytest.raises(errors.NotSupportedError):
            call()


def test_hopper_toggles_mig_without_reset() -> None:
    b = _fake("H100-SXM5-80GB:1")
    assert b.mig_mode(0).current is False
    assert b.set_mig_mode(0, True) is True
    assert b.mig_mode(0).current is True and b.mig_mode(0).pending is True
    assert b.set_mig_mode(0, False) is True
    assert b.mig_mode(0).current is False


def test_ampere_only_records_a_pending_mode_until_a_reset() -> None:
    b = _fake("A100-SXM4-40GB:1")
    assert b.set_mig_mode(0, True) is False                     # reset required
    mode = b.mig_mode(0)
    assert mode.current is False and mode.pending is True
    with pytest.raises(errors.NotSupportedError):
        b.create_gpu_instance(0, 19, Placement(0, 1))
    enabled = _fake("A100-SXM4-40GB:1", mig=True)              # enabled at boot: usable
    assert enabled.mig_mode(0).current is True
    enabled.create_gpu_instance(0, 19, Placement(0, 1))


def test_toggle_is_refused_while_processes_run() -> None:
    b = _fake("H100-SXM5-80GB:1")
    uuid = b.device_info(0).uuid
    b.add_process(uuid, 4242)
    with pytest.raises(errors.InUseError, match="4242"):
        b.set_mig_mode(0, True)
    assert b.mig_mode(0).current is False
    b.remove_process(uuid, 4242)
    assert b.set_mig_mode(0, True) is True


def test_disabling_mig_with_instances_is_refused() -> None:
    b = _fake(mig=True)
    b.create_gpu_instance(0, 19, Placement(0, 1))
    with pytest.raises(errors.InUseError):
        b.set_mig_mode(0, False)


def test_gpu_instance_refusals() -> None:
    b = _fake("H100-SXM5-80GB:1")
    with pytest.raises(errors.NotSupportedError):               # MIG disabled
        b.create_gpu_instance(0, 9, Placement(0, 4))
    b.set_mig_mode(0, True)
    with pytest.raises(errors.InvalidArgumentError):            # unknown profile
        b.create_gpu_instance(0, 42, Placement(0, 1))
    with pytest.raises(errors.InvalidArgumentError):            # 3g only at 0 or 4
        b.create_gpu_instance(0, 9, Placement(2, 4))
    with pytest.raises(errors.InvalidArgumentError):            # wrong size
        b.create_gpu_instance(0, 9, Placement(0, 3))
    gi = b.create_gpu_instance(0, 9, Placement(4, 4))
    with pytest.raises(errors.InsufficientResourcesError):      # overlap
        b.create_gpu_instance(0, 15, Placement(6, 2))
    b.create_gpu_instance(0, 20, Placement(0, 1))               # 1g+me
    with pytest.raises(errors.InsufficientResourcesError):      # +me max one instance
        b.create_gpu_instance(0, 20, Placement(1, 1))
    assert [g.id for g in b.gpu_instances(0)] == sorted([gi, gi + 1])


def test_compute_instances_and_in_use_refusals() -> None:
    b = _fake(mig=True)
    dev = b.create_mig_device(0, 9, Placement(0, 4))
    assert dev.profile_name == "3g.40gb" and dev.memory_mib == 40448 and dev.multiprocessors == 60
    assert dev.uuid.startswith("MIG-")
    with pytest.raises(errors.InUseError):                      # GI with a CI
        b.destroy_gpu_instance(0, dev.gpu_instance_id)
    with pytest.raises(errors.InsufficientResourcesError):      # GI already fully used by one CI
        b.create_compute_instance(0, dev.gpu_instance_id, 0)
    b.add_process(dev.uuid, 7)
    assert b.running_processes(0) == [7]
    with pytest.raises(errors.InUseError):
        b.destroy_compute_instance(0, dev.gpu_instance_id, dev.compute_instance_id)
    b.remove_process(dev.uuid, 7)
    b.destroy_mig_device(0, dev.gpu_instance_id)
    assert b.gpu_instances(0) == [] and b.mig_devices(0) == []


def test_seven_small_instances_fill_an_h100_and_an_eighth_does_not_fit() -> None:
    b = _fake(mig=True)
    for start in range(7):
        b.create_mig_device(0, 19, Placement(start, 1))
    assert len(b.mig_devices(0)) == 7
    with pytest.raises(errors.InsufficientResourcesError):
        b.create_gpu_instance(0, 15, Placement(6, 2))


def test_failed_create_leaves_the_gpu_as_it_was() -> None:
    b = _fake(mig=True)
    b.create_mig_device(0, 5, Placement(0, 4))                  # 4g uses 4 compute slices
    before = b.gpu_instances(0)
    with pytest.raises(errors.InsufficientResourcesError):
        b.create_mig_device(0, 0, Placement(0, 8))
    assert b.gpu_instances(0) == before


def test_state_survives_a_new_backend_on_the_same_state_dir(tmp_path) -> None:
    b1 = _fake(mig=True, state_dir=tmp_path)
    dev = b1.create_mig_device(0, 19, Placement(3, 1))
    b1.set_compute_mode(1, "ExclusiveProcess")
    b2 = _fake(mig=True, state_dir=tmp_path)                    # "the plugin restarted"
    assert [d.uuid for d in b2.mig_devices(0)] == [dev.uuid]
    assert b2.compute_mode(1) == "ExclusiveProcess"
    b2.destroy_mig_device(0, dev.gpu_instance_id)               # and both see each other's changes
    assert b1.mig_devices(0) == []


def test_unreadable_state_file_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(errors.NvmlError, match="delete it"):
        _fake(state_dir=tmp_path)


def test_time_slice_and_compute_mode_validation() -> None:
    b = _fake("L4:1")
    b.set_time_slice(0, "Long")
    assert b.time_slice(0) == "Long"
    with pytest.raises(errors.InvalidArgumentError, match="Default"):
        b.set_time_slice(0, "Forever")
    with pytest.raises(errors.InvalidArgumentError):
        b.set_compute_mode(0, "Exclusive")


def test_unhealthy_gpus_are_reported() -> None:
    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                             "nodes": [{"name": "n", "gpus": [{"model": "T4", "count": 2, "unhealthy": [1]}]}]})
    b = open_backend("fake", profile=profile, node_name="n")
    b.init()
    assert [b.is_healthy(i) for i in range(2)] == [True, False]
    assert isinstance(b, FakeNvml)
    b.set_healthy(b.device_info(1).uuid, True)
    assert b.is_healthy(1)


# -- topology: NVLink fabric, NVLink P2P, PCIe roots ---------------------------------------------------
def test_hopper_on_nvswitch_reports_one_fabric_clique_per_node() -> None:
    from driver.nvml.interface import FABRIC_STATE_COMPLETED

    a = _fake("H100-SXM5-80GB:8", node="node-a")
    infos = [a.gpu_fabric_info(i) for i in range(8)]
    assert {(f.cluster_uuid, f.clique_id) for f in infos} == {(infos[0].cluster_uuid, infos[0].clique_id)}
    assert all(f.state == FABRIC_STATE_COMPLETED and f.status == 0 for f in infos)
    other = _fake("H100-SXM5-80GB:8", node="node-b").gpu_fabric_info(0)
    assert other.cluster_uuid != infos[0].cluster_uuid      # each HGX board is its own NVLink domain


@pytest.mark.parametrize("spec", ["A100-SXM4-80GB:2", "L4:2", "T4:1"])
def test_fabric_info_is_not_supported_before_hopper_and_on_pcie_cards(spec: str) -> None:
    b = _fake(spec)
    with pytest.raises(errors.NotSupportedError, match="NVLink fabric"):
        b.gpu_fabric_info(0)


def test_nvlink_p2p_connects_every_pair_on_an_nvswitch_board_and_nothing_over_pcie() -> None:
    from driver.nvml.interface import P2P_STATUS_NOT_SUPPORTED, P2P_STATUS_OK

    for spec in ("H100-SXM5-80GB:8", "A100-SXM4-80GB:8"):
        b = _fake(spec)
        assert {b.nvlink_p2p_status(i, j) for i in range(8) for j in range(8) if i != j} == {P2P_STATUS_OK}
    mixed = _fake("H100-SXM5-80GB:2,L4:2")
    assert mixed.nvlink_p2p_status(0, 1) == P2P_STATUS_OK
    assert mixed.nvlink_p2p_status(0, 2) == P2P_STATUS_NOT_SUPPORTED
    assert mixed.nvlink_p2p_status(2, 3) == P2P_STATUS_NOT_SUPPORTED
    with pytest.raises(errors.InvalidArgumentError):
        mixed.nvlink_p2p_status(1, 1)


def test_pcie_cards_come_in_pairs_behind_one_root_complex() -> None:
    b = _fake("L4:8")
    roots = [b.device_info(i).pcie_root for i in range(8)]
    numa = [b.device_info(i).numa_node for i in range(8)]
    assert roots[0] == roots[1] and roots[2] == roots[3] and roots[4] == roots[5] and roots[6] == roots[7]
    assert len(set(roots)) == 4 and numa == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len({b.device_info(i).pci_bus_id for i in range(8)}) == 8
