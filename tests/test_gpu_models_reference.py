"""Built-in model data matches the cited reference (tests/reference/gpu-models.yaml)."""

from __future__ import annotations

import pytest
import yaml

from driver.nvml.models import get_model, known_models

REQUIRED = ["A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB", "H200-SXM-141GB", "L4", "T4"]


@pytest.fixture(scope="module")
def reference(reference_dir) -> dict:
    data = yaml.safe_load((reference_dir / "gpu-models.yaml").read_text())
    return {m["key"]: m for m in data["models"]}


def test_all_required_models_are_built_in() -> None:
    assert set(REQUIRED) <= set(known_models())


@pytest.mark.parametrize("key", REQUIRED)
def test_board_figures_match_reference(key, reference) -> None:
    ref, ours = reference[key], get_model(key)
    assert ours.product_name == ref["product_name"]["value"]
    assert ours.pci_device_id == ref["pci_device_id"]["value"]
    assert ours.memory_mib == ref["memory_total_mib"]["value"]
    assert ours.multiprocessors == ref["multiprocessor_count"]["value"]
    assert ours.cuda_compute_capability == ref["cuda_compute_capability"]["value"]
    assert ours.architecture == ref["architecture"]["value"]
    assert ours.mig_capable == ref["mig_capable"]["value"]


@pytest.mark.parametrize("key", [k for k in REQUIRED if get_model(k).mig_capable])
def test_mig_tables_match_reference(key, reference) -> None:
    ref, ours = reference[key]["mig"], get_model(key).mig
    assert ours is not None
    assert ours.memory_slices == ref["memory_slices_total"]["value"]
    assert ours.compute_slices == ref["compute_slices_total"]["value"]
    assert ours.max_gpu_instances == ref["max_gpu_instances"]["value"]
    ref_profiles = {p["profile_id"]["value"]: p for p in ref["profiles"]}
    assert {p.id for p in ours.profiles} == set(ref_profiles)
    for p in ours.profiles:
        r = ref_profiles[p.id]
        assert p.name == r["name"]["value"]
        assert p.nvml_constant == r["nvml_constant"]["numeric"]
        assert p.memory_slices == r["memory_slices"]["value"] == r["placements"]["size"]
        assert p.compute_slices == r["compute_slices"]["value"]
        assert p.multiprocessors == r["multiprocessors"]["value"]
        assert p.max_instances == r["max_instances"]["value"]
        assert list(p.placement_starts) == r["placements"]["starts"]
        eng = r["engines"]
        assert (p.copy_engines, p.decoders, p.encoders, p.jpeg_engines, p.ofa_engines) == (
            eng["copy"], eng["decoder"], eng["encoder"], eng["jpeg"], eng["ofa"])
        # memory depends on the driver: compare within 1 % of the listed GiB figure
        assert abs(p.memory_mib - r["memory"]["gib_listed"] * 1024) <= 0.01 * p.memory_mib
        unverified = any(isinstance(v, dict) and v.get("unverified") for v in r.values())
        assert p.unverified == unverified


@pytest.mark.parametrize("key", [k for k in REQUIRED if get_model(k).mig_capable])
def test_placement_pair_counts(key) -> None:
    mig = get_model(key).mig
    assert mig is not None
    assert sum(len(p.placement_starts) for p in mig.profiles if "+me" not in p.name) == 18
    assert sum(len(p.placement_starts) for p in mig.profiles) == 25
