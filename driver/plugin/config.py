"""The opaque config that applies to each allocated device of a claim.

From ``status.allocation.devices.config`` (which the allocator fills from the DeviceClass and the
claim): entries for our driver, ``FromClass`` first then ``FromClaim``, each in list order; for every
result the last entry that applies to its request wins, and a default GpuConfig (time-slicing,
default interval) applies when none does. Entries for other drivers are ignored.
"""

from __future__ import annotations

from driver.api.config import ConfigError, config_applies, parse_gpu_config

__all__ = ["ConfigError", "effective_configs"]


def effective_configs(claim: dict, driver_name: str, results: list[dict]) -> list[dict]:
    allocation = (claim.get("status") or {}).get("allocation") or {}
    entries = (allocation.get("devices") or {}).get("config") or []
    ours = []
    for source in ("FromClass", "FromClaim"):
        for i, c in enumerate(entries):
            if c.get("source") != source:
                continue
            opaque = c.get("opaque") or {}
            if opaque.get("driver") != driver_name:
                continue
            where = f"claim {claim['metadata'].get('namespace')}/{claim['metadata'].get('name')} " \
                    f"status.allocation.devices.config[{i}].opaque.parameters"
            ours.append((c.get("requests"), parse_gpu_config(opaque.get("parameters"), where)))
    unknown = {c.get("source") for c in entries} - {"FromClass", "FromClaim", None}
    if unknown:
        raise ConfigError(f"claim {claim['metadata'].get('name')}: status.allocation.devices.config has "
                          f"unknown source {sorted(unknown)}; expected FromClass or FromClaim")
    out = []
    for r in results:
        chosen = None
        for requests, cfg in ours:
            if config_applies(requests, r.get("request", "")):
                chosen = cfg
        out.append((chosen.normalized() if chosen else None).to_json() if chosen else None)
    return out
