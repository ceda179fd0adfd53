"""Node selector matching for the allocator: upstream's ``NewNodeSelector(...).Match`` (a selector upstream
cannot parse is an error), from its one home, :mod:`driver.api.nodeselector`."""

from __future__ import annotations

from driver.api.nodeselector import NodeSelectorError, node_matches

__all__ = ["NodeSelectorError", "node_matches"]
