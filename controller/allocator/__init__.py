"""Structured-parameters allocator with upstream Kubernetes semantics, plus packing strategies.

A pure library: no API calls. See :mod:`controller.allocator.types` for the contract.
"""

from .allocator import NOTHING, Allocator, Unavailable, copy_claim_with_tolerations
from .pools import SliceIndex
from .strategies import STRATEGIES, Strategy, get_strategy
from .types import AllocatedState, AllocationError, DeviceID, Features, Node, NodeChoice

#: names, and the modules others may import from (CEL validation, DeviceTaintRules, tolerations, the types,
#: the explain command); the rest is the library's own
__all__ = ["AllocatedState", "AllocationError", "Allocator", "DeviceID", "Features", "NOTHING", "Node",
           "NodeChoice", "STRATEGIES", "SliceIndex", "Strategy", "Unavailable", "cel",
           "copy_claim_with_tolerations", "devicetaints", "explain", "get_strategy", "nodeselector", "pools",
           "search", "types"]
