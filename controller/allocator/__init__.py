"""Structured-parameters allocator with upstream Kubernetes semantics, plus packing strategies.

A pure library: no API calls. See :mod:`controller.allocator.types` for the contract.
"""

from .types import AllocatedState, AllocationError, DeviceID, Features, Node, NodeChoice

__all__ = ["AllocatedState", "AllocationError", "DeviceID", "Features", "Node", "NodeChoice"]
