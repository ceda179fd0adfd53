"""Structured-parameters allocator with upstream Kubernetes semantics, plus packing strategies.

A pure library: no API calls. See :mod:`controller.allocator.types` for the contract.
"""

from .allocator import Allocator, copy_claim_with_tolerations
from .pools import SliceIndex
from .strategies import STRATEGIES, Strategy, get_strategy
from .types import AllocatedState, AllocationError, DeviceID, Features, Node, NodeChoice

__all__ = ["STRATEGIES", "AllocatedState", "AllocationError", "Allocator", "DeviceID", "Features", "Node",
           "NodeChoice", "SliceIndex", "Strategy", "copy_claim_with_tolerations", "get_strategy"]
