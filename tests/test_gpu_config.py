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
    got = [c.settings.time_slicing_config.interval for c in effective_configs(claim, "gpu.partita.dev", results)]
    assert got == ["Long", "Medium", "Short"]
    assert effective_configs(allocated_claim("c", ["d1"]), "gpu.partita.dev", [{"request": "gpu"}]) == [None]


MPS = {**BASE, "sharing": {"strategy": "MPS"}}


@pytest.mark.parametrize(("params", "message"), [
    # an int percentage: booleans, strings and floats are refused, never coerced (true -> 1, "50" -> 50)
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": True}}},
     "sharing.mpsConfig.defaultActiveThreadPercentage: must be an integer from 1 to 100, got True (a boolean)"),
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": "50"}}},
     "sharing.mpsConfig.defaultActiveThreadPercentage: must be an integer from 1 to 100, got '50' (a string)"),
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50.0}}},
     "sharing.mpsConfig.defaultActiveThreadPercentage: must be an integer from 1 to 100, got 50.0 (a number"),
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultPinnedDeviceMemoryLimit": 10737418240}}},
     "sharing.mpsConfig.defaultPinnedDeviceMemoryLimit: must be a quantity string such as '10Gi', got 10737418240"),
    ({**BASE, "sharing": {"strategy": True}}, "sharing.strategy: must be one of TimeSlicing, MPS, got True (a boolean)"),
    ({**BASE, "sharing": {"timeSlicingConfig": {"interval": 2}}},
     "sharing.timeSlicingConfig.interval: must be one of Default, Short, Medium, Long, got 2 (an integer)"),
    ({**BASE, "sharing": {"timeSlicingConfig": "Long"}},
     "sharing.timeSlicingConfig: must be an object such as {interval: Medium}, got 'Long' (a string)"),
    ({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": [50]}}, "sharing.mpsConfig: must be an object"),
    ({**BASE, "sharing": "MPS"}, "sharing: must be an object with strategy"),
    ({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": 1}, "kind: must be 'GpuConfig', got 1 (an integer)"),
])
def test_config_types_are_strict_and_errors_name_the_field_and_the_allowed_form(params, message) -> None:
    with pytest.raises(ConfigError) as e:
        parse_gpu_config(params, "claim ns/c spec.devices.config[0].opaque.parameters")
    assert f"claim ns/c spec.devices.config[0].opaque.parameters.{message}" in str(e.value)


def test_strict_types_still_take_well_typed_values() -> None:
    cfg = parse_gpu_config({**BASE, "sharing": {"strategy": "MPS", "mpsConfig": {
        "defaultActiveThreadPercentage": 50, "defaultPinnedDeviceMemoryLimit": "10Gi"}}})
    assert cfg.to_json()["sharing"]["mpsConfig"] == {"defaultActiveThreadPercentage": 50,
                                                     "defaultPinnedDeviceMemoryLimit": "10Gi"}
    assert parse_gpu_config(MPS).normalized().to_json()["sharing"] == {"strategy": "MPS", "mpsConfig": {}}
