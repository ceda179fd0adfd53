"""Fake-GPU profile files and --fake specs: parsing and the errors users see."""

from __future__ import annotations

import pytest

from driver.nvml.profile import ProfileError, load_profile, parse_profile, profile_from_spec

GOOD = """\
apiVersion: gpu.partita.dev/v1alpha1
kind: FakeGpuProfile
nodes:
- name: node-a
  gpus:
  - {model: H100-SXM5-80GB, count: 8}
- name: "*"
  gpus:
  - {model: A100-SXM4-80GB, count: 2, migEnabled: true}
"""


def test_good_profile_and_node_selection(tmp_path) -> None:
    p = tmp_path / "gpus.yaml"
    p.write_text(GOOD)
    prof = load_profile(p)
    assert [m for m, _, _ in prof.node("node-a").gpu_list()] == ["H100-SXM5-80GB"] * 8
    assert prof.node("other").gpu_list() == [("A100-SXM4-80GB", True, True)] * 2
    assert prof.driver_version == "580.105.08"


def test_no_matching_node_names_the_node_and_the_fix() -> None:
    prof = profile_from_spec("T4:1", node_name="node-a")
    with pytest.raises(ProfileError, match=r"no entry for node 'node-b'.*\"\*\""):
        prof.node("node-b")


@pytest.mark.parametrize(("doc", "expected"), [
    ({"apiVersion": "v1", "kind": "FakeGpuProfile", "nodes": [{"name": "a"}]}, "apiVersion: must be"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "Gpus", "nodes": [{"name": "a"}]}, "kind: must be"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "a", "gpus": [{"model": "H100", "count": 1}]}]}, r"nodes\[0\].gpus\[0\].model: unknown GPU model 'H100'; use one of: A100-SXM4-40GB"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "a", "gpus": [{"model": "T4", "count": 0}]}]}, r"nodes\[0\].gpus\[0\].count"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "a", "gpus": [{"model": "L4", "migEnabled": True}]}]}, "does not support MIG"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "a"}, {"name": "a"}]}, "listed twice"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "a", "gpus": [{"model": "T4", "colour": "green"}]}]}, r"nodes\[0\].gpus\[0\].colour: unknown field"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile"}, "nodes: required field is missing"),
    (["not", "a", "mapping"], "expected a YAML mapping"),
])
def test_bad_profiles_name_the_field_and_the_fix(doc, expected) -> None:
    with pytest.raises(ProfileError, match=expected) as e:
        parse_profile(doc, "gpus.yaml")
    assert "gpus.yaml" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(bad)


def test_fake_spec() -> None:
    prof = profile_from_spec("H100-SXM5-80GB:2, L4")
    assert [m for m, _, _ in prof.node("anything").gpu_list()] == ["H100-SXM5-80GB"] * 2 + ["L4"]
    with pytest.raises(ProfileError, match="count 'x' of T4 is not a number"):
        profile_from_spec("T4:x")
    with pytest.raises(ProfileError, match="unknown GPU model 'B200'"):
        profile_from_spec("B200:1")
    with pytest.raises(ProfileError, match="empty"):
        profile_from_spec("T4:1,,L4:1")
