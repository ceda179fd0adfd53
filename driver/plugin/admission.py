"""What may be prepared on this node, given what is already prepared (docs/device-model.md).

The plugin enforces the device model itself, whatever the claim's allocation says (a second
allocator, a stale or forged allocation): :func:`admit` runs before any side effect of a prepare and
refuses, naming both claims and the device,

* (:func:`check_allocated_here`, with the claim's other checks) an allocation whose ``nodeSelector``
  does not select this node, by name or by this Node's labels;
* the same device (and shareID) twice in one claim's results (each result is one CDI device);
* a shareID that is not a UUID (upstream: a lowercase 8-4-4-4-12 UID), a shared device without one, a
  dedicated device with one, and a shareID of a device used by another share already;
* whole or shared use of a GPU stuck in MIG mode (Ampere: only a reset leaves it), which the node
  does not offer;
* a second use of a GPU across modes: a GPU is used whole, or as MIG devices, or shared — one claim
  at a time whole, never mixed;
* MIG devices whose memory slices overlap (placement start + the profile's slice count), or more
  instances of a profile than the GPU offers;
* shares whose consumed memory, summed over every share of the GPU, exceeds the shared device's
  published memory capacity.

Admin access (``adminAccess: true`` in a result, KEP-5018; the API server admits it only in namespaces
labelled ``resource.kubernetes.io/admin-access: "true"``) grants access to a device regardless of other
allocations: an admin result is checked for its shape (this node, a UUID shareID if it has one) but is
never a use — it is not refused next to other claims, and other claims are not refused next to it
(checkpointed devices with ``adminAccess`` are left out of the uses).

It reads the checkpoint's claims (``Prepared`` and interrupted ``Preparing`` ones: both hold their
devices) and the node's device index; it changes nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from driver.api import constants as C
from driver.api.nodeselector import NodeFacts, selected_node_names, selector_mismatch
from driver.api.quantity import Quantity, QuantityError, format_bytes
from driver.errors import PartitaError
from driver.plugin.checkpoint import PreparedClaim, PreparedDevice
from driver.plugin.devices import DeviceRef
from driver.slices import whole_gpu_usable

#: upstream ``validateUID`` of a result's shareID: a lowercase UUID in 8-4-4-4-12 form
SHARE_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

_FIX = ("this means two allocators handed it out or the allocation was forged; delete one of the claims so it "
        "is allocated again")
_FIX_ONE = "the allocation is corrupt or forged; delete the claim so it is allocated again"


class AdmissionError(PartitaError):
    """The claim may not be prepared here; the message names the claims, the device and the fix."""


class ClaimId(Protocol):
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class Use:
    """One device of one claim, as far as the device model is concerned."""

    claim: str                   # namespace/name
    uid: str
    device: str
    gpu_uuid: str
    type: str                    # gpu | mig | shared
    slices: range | None = None  # mig: memory slices
    profile_id: int | None = None
    share_id: str | None = None
    memory: int = 0              # shared: consumed memory, bytes

    def what(self) -> str:
        if self.type == C.DEVICE_TYPE_MIG and self.slices is not None:
            return f"MIG device {self.device} (memory slices {self.slices.start}-{self.slices.stop - 1})"
        if self.type == C.DEVICE_TYPE_SHARED:
            return f"share {self.share_id} of shared device {self.device}"
        return f"whole GPU {self.device}"


@functools.lru_cache(maxsize=4096)
def _bytes(quantity: str) -> int:
    """A quantity's value (cached: admission compares every share of a GPU, whose memory is written by few
    distinct strings, and parsing one costs more than the whole comparison). Raises QuantityError."""
    return Quantity.parse(quantity).as_int()


def is_admin(result: Mapping) -> bool:
    """The result grants admin access (monitoring, maintenance): upstream's ``adminAccess: true``."""
    return result.get("adminAccess") is True


def _prepared_use(c: PreparedClaim, d: PreparedDevice) -> Use:
    slices = profile = None
    if d.mig is not None:
        slices = range(d.mig.placement_start, d.mig.placement_start + d.mig.placement_size)
        profile = d.mig.profile_id
    memory = 0
    if d.type == C.DEVICE_TYPE_SHARED:
        try:
            memory = _bytes((d.consumed_capacity or {}).get(C.CAP_MEMORY) or "0")
        except QuantityError:
            memory = 0
    return Use(f"{c.namespace}/{c.name}", c.uid, d.device, d.gpu_uuid, d.type, slices, profile, d.share_id, memory)


def _consumed_memory(claim: str, result: Mapping, dev: DeviceRef) -> int:
    consumed = result.get("consumedCapacity")
    raw = consumed.get(C.CAP_MEMORY) if isinstance(consumed, Mapping) else None
    where = f"claim {claim}: status.allocation.devices.results device {dev.name} shareID {result.get('shareID')}"
    if raw is None:
        raise AdmissionError(f"{where} has no consumedCapacity.{C.CAP_MEMORY}: a share of a shared GPU always says "
                             "how much memory it consumes; the allocation is corrupt — delete the claim so it is "
                             "allocated again")
    try:
        memory = _bytes(str(raw))
    except QuantityError as e:
        raise AdmissionError(f"{where}: consumedCapacity.{C.CAP_MEMORY} {raw!r} is not a quantity ({e}); the "
                             "allocation is corrupt — delete the claim so it is allocated again") from None
    if memory < 0:
        raise AdmissionError(f"{where}: consumedCapacity.{C.CAP_MEMORY} {raw!r} is negative; the allocation is "
                             "corrupt — delete the claim so it is allocated again")
    return memory


def _new_use(claim: ClaimId, result: Mapping, dev: DeviceRef) -> Use:
    name = f"{claim.namespace}/{claim.name}"
    share = result.get("shareID")
    if dev.type in (C.DEVICE_TYPE_GPU, C.DEVICE_TYPE_SHARED) and not whole_gpu_usable(dev.gpu):
        raise AdmissionError(f"claim {name}: device {dev.name} cannot be prepared: GPU {dev.gpu.uuid} "
                             f"({dev.gpu.architecture}) is in MIG mode, which it leaves only with a GPU reset, so "
                             "this node offers only its MIG devices; the allocation is stale or forged — delete the "
                             "claim so it is allocated again (or disable MIG on the GPU and reset it)")
    if dev.type == C.DEVICE_TYPE_SHARED and not is_admin(result):
        if not share:
            raise AdmissionError(f"claim {name}: status.allocation.devices.results device {dev.name} is a shared GPU "
                                 "but the result has no shareID; every share of a shared device carries its own "
                                 "(the allocator sets it with DRAConsumableCapacity) — delete the claim so it is "
                                 "allocated again")
    elif share is not None and dev.type != C.DEVICE_TYPE_SHARED:
        raise AdmissionError(f"claim {name}: status.allocation.devices.results device {dev.name} is a dedicated "
                             f"{dev.type} device but the result carries shareID {share!r}; only shared devices "
                             "(allowMultipleAllocations) have shares — delete the claim so it is allocated again")
    if share is not None and (not isinstance(share, str) or not SHARE_ID.match(share)):
        raise AdmissionError(f"claim {name}: status.allocation.devices.results device {dev.name} has shareID "
                             f"{share!r}, which is not a UUID (lowercase 8-4-4-4-12 hex, as the allocator writes "
                             "it); refusing it before it reaches a CDI name or the node — delete the claim so it "
                             "is allocated again")
    if dev.type == C.DEVICE_TYPE_MIG:
        if dev.static_mig is not None:
            pl = dev.static_mig.placement
            slices = range(pl.start, pl.start + pl.size)
            profile = dev.static_mig.profile_id
        else:
            assert dev.profile is not None and dev.placement_start is not None
            slices = range(dev.placement_start, dev.placement_start + dev.profile.memory_slices)
            profile = dev.profile.profile_id
        return Use(name, claim.uid, dev.name, dev.gpu.uuid, dev.type, slices, profile)
    if dev.type == C.DEVICE_TYPE_SHARED:
        return Use(name, claim.uid, dev.name, dev.gpu.uuid, dev.type, share_id=share,
                   memory=0 if is_admin(result) else _consumed_memory(name, result, dev))
    return Use(name, claim.uid, dev.name, dev.gpu.uuid, dev.type)


def _conflict(new: Use, old: Use) -> str | None:
    """How ``old`` (same GPU) excludes ``new`` (a clause to put after old's description), or None."""
    if new.gpu_uuid != old.gpu_uuid:
        return None
    if new.type == C.DEVICE_TYPE_GPU and old.type == C.DEVICE_TYPE_GPU and new.device == old.device:
        return "(the same device)"
    if C.DEVICE_TYPE_GPU in (new.type, old.type) or new.type != old.type:
        return "(the same GPU in another use)"   # whole excludes everything; MIG and shared exclude each other
    if new.type == C.DEVICE_TYPE_MIG:
        assert new.slices is not None and old.slices is not None
        if set(new.slices) & set(old.slices):
            return "(it overlaps: the same memory slices)"
        return None
    if new.share_id == old.share_id and new.device == old.device:
        return "(the same shareID)"
    return None


def check_allocated_here(claim: str, allocation: Mapping, node: NodeFacts) -> None:
    """Refuse an allocation whose ``nodeSelector`` does not select this node (by name or labels)."""
    selector = allocation.get("nodeSelector")
    reasons = selector_mismatch(selector, node)
    if reasons is None:
        return
    names = selected_node_names(selector)
    if names is not None:
        raise AdmissionError(f"claim {claim} is allocated for node(s) {sorted(names)} "
                             f"(status.allocation.nodeSelector), not this node {node.name}; the pod belongs on that "
                             "node — delete and re-create the pod or its claim")
    raise AdmissionError(f"claim {claim}: status.allocation.nodeSelector does not select this node {node.name} "
                         f"({'; '.join(reasons)}); the devices were allocated for another node — delete and "
                         "re-create the pod or its claim")


def admit(prepared: Mapping[str, PreparedClaim], claim: ClaimId, results: Iterable[Mapping],
          devices: Mapping[str, DeviceRef]) -> None:
    """Raise :class:`AdmissionError` unless ``results`` (this driver's results of ``claim``'s
    allocation) may be prepared next to the ``prepared`` claims. Results naming devices this node does
    not publish are left to the caller (which refuses them)."""
    name = f"{claim.namespace}/{claim.name}"
    in_use = [_prepared_use(c, d) for c in prepared.values() if c.uid != claim.uid for d in c.devices
              if not d.admin_access]
    gpus = {}
    seen: set[tuple[str, str | None]] = set()
    for result in results:
        dev = devices.get(result.get("device", ""))
        if dev is None:
            continue
        new = _new_use(claim, result, dev)
        if (dev.name, new.share_id) in seen:     # one CDI device per result: a result twice is corrupt
            raise AdmissionError(f"claim {name}: status.allocation.devices.results names device {dev.name}"
                                 f"{f' shareID {new.share_id}' if new.share_id else ''} twice; {_FIX_ONE}")
        seen.add((dev.name, new.share_id))
        if is_admin(result):
            continue                 # admin access is never a use of the device
        gpus[dev.gpu.uuid] = dev.gpu
        for old in in_use:
            why = _conflict(new, old)
            if why:
                holder = ("is also in this claim's allocation" if old.uid == claim.uid else
                          f"is already prepared for claim {old.claim} (uid {old.uid})")
                raise AdmissionError(f"claim {name}: {new.what()} cannot be prepared: {old.what()} {why} {holder}, "
                                     f"on GPU {new.gpu_uuid}; a GPU is used whole, as MIG devices that do not overlap, "
                                     f"or shared, one use at a time — {_FIX}")
        in_use.append(new)
    for uuid, gpu in gpus.items():
        on_gpu = [u for u in in_use if u.gpu_uuid == uuid]
        mine = [u for u in on_gpu if u.uid == claim.uid]
        for profile in gpu.mig_profiles:
            same = [u for u in on_gpu if u.type == C.DEVICE_TYPE_MIG and u.profile_id == profile.profile_id]
            if len(same) > profile.max_instances and any(u.uid == claim.uid for u in same):
                others = sorted({f"claim {u.claim} ({u.device})" for u in same if u.uid != claim.uid})
                new = next(u for u in same if u.uid == claim.uid)
                raise AdmissionError(f"claim {name}: {new.what()} cannot be prepared: GPU {uuid} offers at most "
                                     f"{profile.max_instances} MIG device(s) of profile {profile.name}, and with "
                                     f"{', '.join(others) or 'the others of this claim'} there would be {len(same)}; "
                                     f"{_FIX if others else _FIX_ONE}")
        shares = [u for u in on_gpu if u.type == C.DEVICE_TYPE_SHARED]
        if any(u.type == C.DEVICE_TYPE_SHARED for u in mine):
            capacity = _bytes(format_bytes(gpu.memory_bytes))
            total = sum(u.memory for u in shares)
            if total > capacity:
                others = [f"claim {u.claim} ({format_bytes(u.memory)})" for u in shares if u.uid != claim.uid]
                asked = sum(u.memory for u in mine if u.type == C.DEVICE_TYPE_SHARED)
                raise AdmissionError(f"claim {name}: its share(s) of {shares[0].device} consume {format_bytes(asked)} "
                                     "of memory; with the shares already prepared for "
                                     f"{', '.join(others) or 'no other claim'} the GPU's shares would consume "
                                     f"{format_bytes(total)}, more than the shared device's published capacity "
                                     f"{format_bytes(capacity)}; {_FIX if others else _FIX_ONE}")
