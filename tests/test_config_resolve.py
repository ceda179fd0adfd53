"""Opaque config resolved once (driver/api/config.py resolve): class entries first, then the claim's, the last
that applies wins, defaults filled in; the plugin, its checkpoint, its sharing set-up and the controller's
share-mode rule all take the typed GpuConfig from there."""

from __future__ import annotations

import json

import pytest

from controller.operator.sharingmodes import allocation_shares, claim_strategies
from driver.api.config import DEFAULT_INTERVAL, DEFAULT_STRATEGY, ConfigError, GpuConfig, resolve, settings_of
from driver.plugin.checkpoint import Checkpoint, CheckpointStore, PreparedClaim, PreparedDevice
from driver.plugin.sharing import strategy_of

DRIVER = "gpu.partita.dev"
BASE = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig"}


def _ts(interval: str) -> dict:
    return {**BASE, "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": interval}}}


def _entry(source: str | None, params: object, requests: list[str] | None = None, driver: str = DRIVER) -> dict:
    e: dict = {"opaque": {"driver": driver, "parameters": params}}
    if source:
        e["source"] = source
    if requests:
        e["requests"] = requests
    return e


def test_class_first_then_claim_and_the_last_that_applies_wins() -> None:
    configs = [_entry("FromClaim", _ts("Long"), ["nb"]), _entry("FromClass", _ts("Short")),
               _entry("FromClaim", _ts("Medium"), ["other"]), _entry("FromClaim", {"x": 1}, driver="x.example.com")]
    got = {r: resolve(configs, DRIVER, r).settings.time_slicing_config.interval for r in ("nb", "other/sub", "third")}
    assert got == {"nb": "Long", "other/sub": "Medium", "third": "Short"}
    assert resolve([], DRIVER, "nb") is None
    assert resolve([_entry("FromClaim", _ts("Long"), ["a"])], DRIVER, "b") is None


def test_the_resolved_config_has_every_default_filled_in() -> None:
    cfg = resolve([_entry("FromClaim", dict(BASE))], DRIVER, "r")
    assert isinstance(cfg, GpuConfig)
    assert cfg.to_json() == {**BASE, "sharing": {"strategy": DEFAULT_STRATEGY,
                                                 "timeSlicingConfig": {"interval": DEFAULT_INTERVAL}}}
    mps = resolve([_entry("FromClass", {**BASE, "sharing": {"strategy": "MPS"}})], DRIVER, "r")
    assert mps.strategy == "MPS" and mps.settings.mps_config is not None
    assert settings_of(None).strategy == DEFAULT_STRATEGY           # no config at all: the same defaults
    assert strategy_of(None)[0] == strategy_of(cfg)[0] == DEFAULT_STRATEGY


def test_strict_names_the_entry_and_lenient_skips_it() -> None:
    configs = [_entry("FromClass", _ts("Short")), _entry("FromClaim", {**BASE, "sharing": {"strategy": "Nope"}})]
    with pytest.raises(ConfigError, match=r"claim ns/c status\.allocation\.devices\.config\[1\]\.opaque\.parameters"
                                          r"\.sharing\.strategy: must be one of TimeSlicing, MPS"):
        resolve(configs, DRIVER, "r", where="claim ns/c status.allocation.devices.config")
    assert resolve(configs, DRIVER, "r", strict=False).settings.time_slicing_config.interval == "Short"
    with pytest.raises(ConfigError, match=r"has unknown source \['FromElsewhere'\]"):
        resolve([_entry("FromElsewhere", _ts("Short"))], DRIVER, "r")


def _claim(config: list[dict]) -> dict:
    return {"metadata": {"name": "c", "namespace": "ns"}, "spec": {"devices": {
        "requests": [{"name": "a", "exactly": {"deviceClassName": "mps-class"}},
                     {"name": "b", "firstAvailable": [{"name": "x", "deviceClassName": "plain"}]}],
        "config": config}}}


def test_the_controller_predicts_what_the_plugin_resolves_from_the_allocation() -> None:
    classes = {"mps-class": {"spec": {"config": [{"opaque": {"driver": DRIVER,
                                                            "parameters": {**BASE, "sharing": {"strategy": "MPS"}}}}]}},
               "plain": {"spec": {}}}
    claim_config = [_entry(None, _ts("Long"), ["b"])]
    # before allocation, from the claim and its classes
    assert claim_strategies(_claim(claim_config), classes, DRIVER) == {"MPS", "TimeSlicing"}
    # after: the allocation carries the class config (for its request) then the claim's, as the allocator copies them
    allocation = {"devices": {
        "config": [{"source": "FromClass", "requests": ["a"], **classes["mps-class"]["spec"]["config"][0]},
                   {"source": "FromClaim", **claim_config[0]}],
        "results": [{"request": "a", "driver": DRIVER, "pool": "n1", "device": "gpu-0-shared", "shareID": "s1"},
                    {"request": "b/x", "driver": DRIVER, "pool": "n1", "device": "gpu-1-shared", "shareID": "s2"},
                    {"request": "b/x", "driver": DRIVER, "pool": "n1", "device": "gpu-2"}]}}   # no share: not counted
    shares = allocation_shares(allocation, DRIVER)
    assert {d.device: s for d, s in shares.items()} == {"gpu-0-shared": "MPS", "gpu-1-shared": "TimeSlicing"}
    # an invalid claim config decides nothing in the controller (the plugin refuses it, with its field)
    bad = [_entry(None, {**BASE, "sharing": {"strategy": "Nope"}})]
    assert claim_strategies(_claim(bad), classes, DRIVER) == {"MPS", DEFAULT_STRATEGY}


def test_the_checkpoint_keeps_the_typed_config_in_the_json_it_always_wrote(tmp_path) -> None:
    cfg = resolve([_entry("FromClaim", {**BASE, "sharing": {"strategy": "MPS",
                                                            "mpsConfig": {"defaultActiveThreadPercentage": 50}}})],
                  DRIVER, "r")
    dev = PreparedDevice(requestNames=["r"], pool="n1", device="gpu-0-shared", shareID="s1", cdiDeviceIDs=["x"],
                         type="shared", gpuUUID="GPU-1", config=cfg)
    store = CheckpointStore(tmp_path / "checkpoint.json")
    store.write(Checkpoint(claims={"u1": PreparedClaim(uid="u1", namespace="ns", name="c", state="Prepared",
                                                       devices=[dev])}))
    on_disk = json.loads((tmp_path / "checkpoint.json").read_text())
    assert on_disk["claims"]["u1"]["devices"][0]["config"] == {
        **BASE, "sharing": {"strategy": "MPS", "mpsConfig": {"defaultActiveThreadPercentage": 50}}}
    back = store.read().claims["u1"].devices[0].config
    assert isinstance(back, GpuConfig) and back == cfg
    assert strategy_of(back)[1].mps_config.default_active_thread_percentage == 50
