"""GpuConfig: validation messages and which config applies to which device."""

from __future__ import annotations

import pytest

from driver.api.config import ConfigError, parse_gpu_config, validate_claim_configs
from driver.plugin.config import effective_configs
from tests.support.claims import allocated_claim

BASE = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig"}


def test_defaults_normalize_to_time_slicing() -> None:
    assert parse_gpu_config(BASE).normalized().to_json() == {
        **BASE, "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}}}
    mps = parse_gpu_config({**BASE, "sharing": {"strategy": "MPS"}}).normalized().to_json()
    assert mps["sharing"] == {"strategy": "MPS", "mpsConfig": {}}


@pytest.mark.parametrize(("params", "message"), [
    ({**BASE, "sharing": {"strategy": "SpacePartitioning"}}, "sharing.strategy: must be one of TimeSlicing, MPS, got 'SpacePartitioning'"),
    ({**BASE, "sharing": {"timeSlicingConfig": {"interval": "Forever"}}}, "sharing.timeSlicingConfig.interval: must be one of Default, Short, Medium, Long"),
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 150}}}, "defaultActiveThreadPercentage: must be an integer from 1 to 100"),
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": "lots"}}}, "defaultPinnedDeviceMemoryLimit: quantity 'lots' is not valid"),
    ({**BASE, "sharing": {"strategy": "TimeSlicing", "mpsConfig": {}}}, "mpsConfig cannot be used with strategy TimeSlicing"),
    ({**BASE, "sharing": {"strategy": "MPS", "timeSlicingConfig": {}}}, "timeSlicingConfig cannot be used with strategy MPS"),
    ({**BASE, "sharing": {"intervall": "Long"}}, "sharing.intervall: unknown field"),
    ({"apiVersion": "v1", "kind": "GpuConfig"}, "apiVersion: must be 'gpu.partita.dev/v1alpha1'"),
    ("not a map", "expected a GpuConfig object"),
])
def test_invalid_configs_name_the_field_and_allowed_values(params, message) -> None:
    with pytest.raises(ConfigError) as e:
        parse_gpu_config(params, "claim ns/c spec.devices.config[0].opaque.parameters")
    assert message in str(e.value)
    assert "claim ns/c spec.devices.config[0].opaque.parameters" in str(e.value)


def test_validate_claim_configs_only_checks_our_driver() -> None:
    spec = {"devices": {"config": [
        {"opaque": {"driver": "other.example.com", "parameters": {"anything": 1}}},
        {"opaque": {"driver": "gpu.partita.dev", "parameters": {**BASE, "sharing": {"strategy": "X"}}}}]}}
    (err,) = validate_claim_configs(spec, "gpu.partita.dev", "claim ns/c spec.devices")
    assert "claim ns/c spec.devices.config[1].opaque.parameters.sharing.strategy" in err


def test_class_config_first_claim_config_after_later_wins() -> None:
    def cfg(source, interval, requests=None):
        c = {"source": source, "opaque": {"driver": "gpu.partita.dev", "parameters": {
            **BASE, "sharing": {"timeSlicingConfig": {"interval": interval}}}}}
        if requests:
            c["requests"] = requests
        return c

    claim = allocated_claim("c", ["d1"], request="nb", config=[
        cfg("FromClaim", "Long", ["nb"]), cfg("FromClass", "Short"), cfg("FromClaim", "Medium", ["other"]),
        {"source": "FromClaim", "opaque": {"driver": "x.example.com", "parameters": {}}}])
    results = [{"request": "nb"}, {"request": "other/sub"}, {"request": "third"}]
    got = [c["sharing"]["timeSlicingConfig"]["interval"] for c in effective_configs(claim, "gpu.partita.dev", results)]
    assert got == ["Long", "Medium", "Short"]
    assert effective_configs(allocated_claim("c", ["d1"]), "gpu.partita.dev", [{"request": "gpu"}]) == [None]
