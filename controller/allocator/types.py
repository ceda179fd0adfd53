"""Public types of the allocator library (no API calls anywhere in ``controller/allocator``).

Inputs are Kubernetes API objects as plain JSON dicts (camelCase, exactly what the API server and
kopf hand out, and what the conformance fixtures hold). Outputs are ``AllocationResult`` dicts in the
same form, ready to be written to ``ResourceClaim.status.allocation``.

Contract used by the operator (``controller/operator``), the sandbox and ``partita explain``:

    slices = SliceIndex()                    # keep one for the life of the process
    slices.upsert(slice_dict); slices.delete(name)   # from the informer / watch
    allocator = Allocator(features=Features(), strategy="pack")
    state = AllocatedState.from_claims(all_allocated_claims)   # + in-flight allocations
    try:
        results = allocator.allocate(node, claims, slices, classes, state)
    except AllocationError as e: ...         # fatal for this attempt (bad CEL, unknown class, ...)
    if results is None: ...                  # unsatisfiable on this node
    else: results[i] is the AllocationResult dict for claims[i]

    # or let the strategy pick the node among candidates that already passed node fit:
    choice = allocator.allocate_on_nodes(nodes, claims, slices, classes, state)
    choice.node / choice.results / choice.unsatisfiable_reasons
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from driver.api.quantity import Quantity

#: Upstream allocator feature names (``structured/internal/types.go`` ``Features``) as fixtures use them.
FEATURE_NAMES = {
    "DRAAdminAccess": "admin_access",
    "DRAPrioritizedList": "prioritized_list",
    "DRAPartitionableDevices": "partitionable_devices",
    "DRADeviceTaints": "device_taints",
    "DRAConsumableCapacity": "consumable_capacity",
    "DRADeviceBindingConditions": "device_binding_and_status",
    "DRAResourceClaimDeviceStatus": "device_binding_and_status",
    "DRAListTypeAttributes": "list_type_attributes",
}


@dataclass(frozen=True)
class Features:
    """Allocator feature switches. Defaults are what Partita runs with on Kubernetes 1.36+."""

    admin_access: bool = True
    prioritized_list: bool = True
    partitionable_devices: bool = True
    device_taints: bool = True
    consumable_capacity: bool = True
    device_binding_and_status: bool = False
    list_type_attributes: bool = False

    @classmethod
    def from_names(cls, names: Iterable[str]) -> "Features":
        """Only the named features on (the conformance fixtures' ``features`` list)."""
        on = {}
        for n in names:
            if n not in FEATURE_NAMES:
                raise ValueError(f"unknown allocator feature {n!r}; known: {sorted(FEATURE_NAMES)}")
            on[FEATURE_NAMES[n]] = True
        return cls(**{f: on.get(f, False) for f in cls.__dataclass_fields__})


@dataclass(frozen=True, order=True)
class DeviceID:
    driver: str
    pool: str
    device: str

    def __str__(self) -> str:
        return f"{self.driver}/{self.pool}/{self.device}"


@dataclass
class AllocatedState:
    """What other claims already hold (kube-scheduler's ``AllocatedState``)."""

    devices: set[DeviceID] = field(default_factory=set)
    shares: set[tuple[DeviceID, str]] = field(default_factory=set)
    capacity: dict[DeviceID, dict[str, Quantity]] = field(default_factory=dict)

    @classmethod
    def from_claims(cls, claims: Iterable[Mapping], consumable_capacity: bool = True) -> "AllocatedState":
        """Build from every claim with ``status.allocation`` (as ``allocateddevices.go`` does)."""
        state = cls()
        for claim in claims:
            allocation = (claim.get("status") or {}).get("allocation")
            if allocation:
                state.add_allocation(allocation, consumable_capacity)
        return state

    def add_allocation(self, allocation: Mapping, consumable_capacity: bool = True) -> None:
        for r in ((allocation.get("devices") or {}).get("results") or []):
            if r.get("adminAccess"):
                continue
            did = DeviceID(r["driver"], r["pool"], r["device"])
            if consumable_capacity and r.get("shareID"):
                self.shares.add((did, r["shareID"]))
                consumed = self.capacity.setdefault(did, {})
                for name, q in (r.get("consumedCapacity") or {}).items():
                    consumed[name] = consumed.get(name, Quantity.parse(0)) + Quantity.parse(q)
            else:
                self.devices.add(did)

    def remove_allocation(self, allocation: Mapping, consumable_capacity: bool = True) -> None:
        for r in ((allocation.get("devices") or {}).get("results") or []):
            if r.get("adminAccess"):
                continue
            did = DeviceID(r["driver"], r["pool"], r["device"])
            if consumable_capacity and r.get("shareID"):
                self.shares.discard((did, r["shareID"]))
                consumed = self.capacity.get(did)
                if consumed is not None:
                    for name, q in (r.get("consumedCapacity") or {}).items():
                        if name in consumed:
                            consumed[name] = consumed[name] - Quantity.parse(q)
                    if all(v.sign() <= 0 for v in consumed.values()):
                        del self.capacity[did]
            else:
                self.devices.discard(did)

    def copy(self) -> "AllocatedState":
        return AllocatedState(set(self.devices), set(self.shares),
                              {k: dict(v) for k, v in self.capacity.items()})


@dataclass(frozen=True)
class Node:
    """The node an allocation is attempted for (node selectors match its labels and ``metadata.name``)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


class AllocationError(Exception):
    """A fatal problem with the input (not "does not fit"): bad CEL, unknown class, >32 results, ...

    The message names the claim, the request and the field, and says what to change.
    ``node_local`` is True when the problem only rules out this node (upstream
    ``ErrFailedAllocationOnNode``, e.g. invalid pools); the caller may try other nodes.
    """

    def __init__(self, message: str, *, node_local: bool = False, claim: str | None = None,
                 request: str | None = None, field: str | None = None):
        super().__init__(message)
        self.node_local = node_local
        self.claim = claim
        self.request = request
        self.field = field


@dataclass
class NodeChoice:
    """Result of :meth:`Allocator.allocate_on_nodes`."""

    node: Node | None                          # None: no candidate node fits
    results: list[dict] | None                 # AllocationResult per claim, in claim order
    unsatisfiable_reasons: dict[str, str] = field(default_factory=dict)   # node name -> short reason
