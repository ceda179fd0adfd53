"""discover(): an NVML backend's view of a node as the Inventory model."""

from __future__ import annotations

import pytest

from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.nvml.interface import Placement
from driver.nvml.models import get_model
from driver.nvml.profile import parse_profile

MODELS = ["A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB", "H200-SXM-141GB", "L4", "T4"]


@pytest.mark.parametrize("model", MODELS)
def test_discover_each_model(model) -> None:
    b = open_backend("fake", profile=profile_from_spec(f"{model}:2"), node_name="n1")
    b.init()
    inv = discover(b, "n1")
    spec = get_model(model)
    assert inv.node_name == "n1" and inv.backend == "fake" and inv.driver_version == "580.105.08"
    assert len(inv.gpus) == 2 and len({g.uuid for g in inv.gpus}) == 2
    g = inv.gpus[0]
    assert (g.product_name, g.architecture, g.memory_bytes, g.multiprocessors) == (
        spec.product_name, spec.architecture, spec.memory_mib * 2**20, spec.multiprocessors)
    assert g.pci_bus_id and g.pcie_root and g.numa_node is not None and g.healthy
    assert g.mig_capable == spec.mig_capable
    if spec.mig_capable:
        assert g.memory_slices == 8
        assert sum(len(p.placements) for p in g.mig_profiles) == 25
        assert {p.profile_id for p in g.mig_profiles} == {19, 20, 15, 14, 9, 5, 0}
    else:
        assert g.memory_slices == 0 and g.mig_profiles == ()


def test_discover_reports_existing_mig_devices_and_modes() -> None:
    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                             "nodes": [{"name": "n1", "gpus": [{"model": "A100-SXM4-40GB", "count": 2,
                                                                "migEnabled": True}]}]})
    b = open_backend("fake", profile=profile, node_name="n1")
    b.init()
    dev = b.create_mig_device(0, 9, Placement(4, 4))
    inv = discover(b, "n1")
    g0, g1 = inv.gpus
    assert g0.mig_enabled and g1.mig_enabled and g0.mig_pending
    assert [(d.uuid, d.profile_name, d.placement.start, d.memory_mib) for d in g0.mig_devices] == [
        (dev.uuid, "3g.20gb", 4, 19968)]
    assert g1.mig_devices == ()
