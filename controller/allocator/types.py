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

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

from driver.api.quantity import Quantity
from driver.errors import PartitaError

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


class DeviceID(NamedTuple):
    """A device's identity (a tuple, so hashing it is cheap on hot paths)."""

    driver: str
    pool: str
    device: str

    def __str__(self) -> str:
        return f"{self.driver}/{self.pool}/{self.device}"


class AllocatedState:
    """What other claims already hold (kube-scheduler's ``AllocatedState``).

    ``devices``: dedicated devices in use; ``shares``: (device, shareID) of multi-allocatable devices;
    ``capacity``: capacity consumed per multi-allocatable device. Change it only through the methods:
    they also keep a content-based signature per pool (count and XOR of hashes), which lets the
    allocator cache per-node work and stays the same for two states with the same content.

    Each change is also journaled (the pool it touched), so that an allocator's node index can drop
    what it knew about exactly the nodes whose pools changed (see :mod:`controller.allocator.nodeindex`):
    ``uid`` names this state object, ``changes`` counts its changes, :meth:`changed_pools` reads the
    journal. The journal is bounded; a reader that fell behind is told to start over.
    """

    #: journal entries kept at most; older ones are dropped (readers behind them start over)
    JOURNAL_LIMIT = 65536
    _uids = itertools.count(1)

    def __init__(self, devices: set[DeviceID] | None = None, shares: set[tuple[DeviceID, str]] | None = None,
                 capacity: dict[DeviceID, dict[str, Quantity]] | None = None):
        self.devices: set[DeviceID] = set()
        self.shares: set[tuple[DeviceID, str]] = set()
        self.capacity: dict[DeviceID, dict[str, Quantity]] = {}
        self.share_counts: dict[DeviceID, int] = {}
        self._sig: dict[tuple[str, str], list[int]] = {}
        #: (driver, pool) -> device name -> number of reasons it is allocated (dedicated, shares, capacity)
        self.by_pool: dict[tuple[str, str], dict[str, int]] = {}
        self.uid = next(AllocatedState._uids)
        self.changes = 0
        self._journal: list[tuple[str, str]] = []
        self._journal_start = 0        # the change number of _journal[0]
        for d in devices or ():
            self.add_device(d)
        for d, share in shares or ():
            self.add_share(d, share)
        for d, caps in (capacity or {}).items():
            self.add_capacity(d, caps)

    # -- signatures ---------------------------------------------------------------------------
    def _touch(self, did: DeviceID, item: object, sign: int) -> None:
        pid = (did.driver, did.pool)
        if len(self._journal) >= self.JOURNAL_LIMIT:
            self._journal_start += len(self._journal)
            self._journal.clear()
        self._journal.append(pid)
        self.changes += 1
        sig = self._sig.setdefault(pid, [0, 0])
        sig[0] += sign
        sig[1] ^= hash(item)
        if sign:
            names = self.by_pool.setdefault(pid, {})
            n = names.get(did.device, 0) + sign
            if n > 0:
                names[did.device] = n
            else:
                names.pop(did.device, None)

    def changed_pools(self, since: int) -> list[tuple[str, str]] | None:
        """The pools touched by changes number ``since`` .. ``changes`` - 1 (repeats kept), or None when the
        journal no longer reaches back that far."""
        if since < self._journal_start:
            return None
        return self._journal[since - self._journal_start:]

    def pool_signature(self, driver: str, pool: str) -> tuple[int, int]:
        sig = self._sig.get((driver, pool))
        return (sig[0], sig[1]) if sig else (0, 0)

    # -- changes ------------------------------------------------------------------------------
    def add_device(self, did: DeviceID) -> None:
        if did not in self.devices:
            self.devices.add(did)
            self._touch(did, ("d", did), 1)

    def remove_device(self, did: DeviceID) -> None:
        if did in self.devices:
            self.devices.discard(did)
            self._touch(did, ("d", did), -1)

    def add_share(self, did: DeviceID, share_id: str) -> None:
        if (did, share_id) not in self.shares:
            self.shares.add((did, share_id))
            self.share_counts[did] = self.share_counts.get(did, 0) + 1
            self._touch(did, ("s", did, share_id), 1)

    def remove_share(self, did: DeviceID, share_id: str) -> None:
        if (did, share_id) in self.shares:
            self.shares.discard((did, share_id))
            self.share_counts[did] -= 1
            if not self.share_counts[did]:
                del self.share_counts[did]
            self._touch(did, ("s", did, share_id), -1)

    def add_capacity(self, did: DeviceID, consumed: Mapping[str, Quantity], sign: int = 1) -> None:
        existed = did in self.capacity
        caps = self.capacity.setdefault(did, {})
        old = tuple(sorted((k, v.value) for k, v in caps.items()))
        for name, q in consumed.items():
            caps[name] = caps.get(name, Quantity.parse(0)) + (q if sign > 0 else -q)
        if all(v.sign() <= 0 for v in caps.values()):
            del self.capacity[did]
            new: tuple = ()
        else:
            new = tuple(sorted((k, v.value) for k, v in caps.items()))
        self._touch(did, ("c", did, old), 0)
        self._touch(did, ("c", did, new), 0)
        now = did in self.capacity
        if now != existed:
            self._touch(did, ("cap", did), 1 if now else -1)

    def is_allocated(self, did: DeviceID) -> bool:
        return did in self.devices or did in self.share_counts or did in self.capacity

    def allocated_in_pool(self, driver: str, pool: str) -> Iterable[str]:
        """Names of the pool's devices held by other claims in any way."""
        return self.by_pool.get((driver, pool), {}).keys()

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
        self._apply(allocation, consumable_capacity, 1)

    def remove_allocation(self, allocation: Mapping, consumable_capacity: bool = True) -> None:
        self._apply(allocation, consumable_capacity, -1)

    def _apply(self, allocation: Mapping, consumable_capacity: bool, sign: int) -> None:
        for r in ((allocation.get("devices") or {}).get("results") or []):
            if r.get("adminAccess"):
                continue
            did = DeviceID(r["driver"], r["pool"], r["device"])
            if consumable_capacity and r.get("shareID"):
                if sign > 0:
                    self.add_share(did, r["shareID"])
                else:
                    self.remove_share(did, r["shareID"])
                consumed = {k: Quantity.parse(v) for k, v in (r.get("consumedCapacity") or {}).items()}
                if consumed and (sign > 0 or did in self.capacity):
                    self.add_capacity(did, consumed, sign)
            elif sign > 0:
                self.add_device(did)
            else:
                self.remove_device(did)

    def copy(self) -> "AllocatedState":
        c = AllocatedState()
        c.devices = set(self.devices)
        c.shares = set(self.shares)
        c.capacity = {k: dict(v) for k, v in self.capacity.items()}
        c.share_counts = dict(self.share_counts)
        c._sig = {k: list(v) for k, v in self._sig.items()}
        c.by_pool = {k: dict(v) for k, v in self.by_pool.items()}
        return c


@dataclass(frozen=True)
class Node:
    """The node an allocation is attempted for (node selectors match its labels and ``metadata.name``)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


class AllocationError(PartitaError):
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
