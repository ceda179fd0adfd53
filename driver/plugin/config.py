"""The opaque config that applies to each allocated device of a claim.

From ``status.allocation.devices.config`` (which the allocator fills from the DeviceClass and the
claim), resolved by :func:`driver.api.config.resolve` (class entries first, then the claim's, the last
that applies to a result's request wins); None where none applies (the sharing defaults are
:func:`driver.api.config.settings_of`'s). Entries for other drivers are ignored.
"""

from __future__ import annotations

from driver.api.config import ConfigError, GpuConfig, parsed_configs, resolve_parsed
from driver.api.objects import allocation, allocation_configs, key

__all__ = ["ConfigError", "effective_configs"]


def effective_configs(claim: dict, driver_name: str, results: list[dict]) -> list[GpuConfig | None]:
    """The config of each result (in order); :class:`ConfigError` for an invalid config of ``driver_name``."""
    entries = allocation_configs(allocation(claim))
    parsed = parsed_configs(entries, driver_name, where=f"claim {key(claim)} status.allocation.devices.config")
    return [resolve_parsed(parsed, r.get("request", "")) for r in results]
