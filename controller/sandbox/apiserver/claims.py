"""ResourceClaim rules (kubernetes pkg/registry/resource/resourceclaim/strategy.go, the status rules the
product depends on): ``status.allocation`` is immutable once set, ``reservedFor`` needs an allocation, no
new consumers while the claim is being deleted; ``status.devices`` (KEP-4817) validated as upstream does
(validation.validate_claim_status: allocated devices only, conditions, ``data`` a JSON object of at most
10 KiB) and its entries for deallocated devices dropped; with DRAConsumableCapacity off, results lose
``shareID``/``consumedCapacity``; with DRAResourceClaimDeviceStatus off, ``status.devices`` is dropped
(dropDisabledDRAResourceClaimDeviceStatusFields), each unless the stored claim already uses it."""

from __future__ import annotations

from .. import validation
from .errors import ApiError
from .gates import FeatureGates
from .strategy import Strategy


def _results(claim: dict) -> list[dict]:
    return (((claim.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []


class ClaimStrategy(Strategy):
    def prepare_for_status_update(self, obj: dict, old: dict, gates: FeatureGates) -> None:
        drop_disabled_status_fields(obj, old, gates)
        validate_status_update(obj, old)
        validation.drop_deallocated_status_devices(obj, old)
        try:
            validation.validate_claim_status(obj)
        except validation.Rejected as e:
            name = (old.get("metadata") or {}).get("name", "")
            raise ApiError(e.code, e.reason, e.message, e.details(name, "resource.k8s.io", "ResourceClaim")) from None


def drop_disabled_status_fields(new: dict, old: dict, gates: FeatureGates) -> None:
    if not gates.enabled("DRAResourceClaimDeviceStatus") and not (old.get("status") or {}).get("devices"):
        (new.get("status") or {}).pop("devices", None)
    if gates.enabled("DRAConsumableCapacity") or any(r.get("shareID") for r in _results(old)):
        return
    for r in _results(new):
        r.pop("shareID", None)
        r.pop("consumedCapacity", None)


def validate_status_update(new: dict, old: dict) -> None:
    name = old["metadata"]["name"]
    o_status, n_status = old.get("status") or {}, new.get("status") or {}
    o_alloc, n_alloc = o_status.get("allocation"), n_status.get("allocation")
    if o_alloc is not None and n_alloc is not None and o_alloc != n_alloc:
        raise ApiError(422, "Invalid", f'ResourceClaim.resource.k8s.io "{name}" is invalid: '
                                       "status.allocation: Invalid value: field is immutable")
    if n_status.get("reservedFor") and n_alloc is None:
        raise ApiError(422, "Invalid", f'ResourceClaim.resource.k8s.io "{name}" is invalid: '
                                       "status.reservedFor: Forbidden: may not be specified when `allocated` is not set")
    if old["metadata"].get("deletionTimestamp"):
        before = {r.get("uid") for r in o_status.get("reservedFor") or []}
        after = {r.get("uid") for r in n_status.get("reservedFor") or []}
        if after - before:
            raise ApiError(422, "Invalid", f'ResourceClaim.resource.k8s.io "{name}" is invalid: '
                                           "status.reservedFor: Forbidden: new entries may not be added while "
                                           "`deallocationRequested` or `deletionTimestamp` are set")
