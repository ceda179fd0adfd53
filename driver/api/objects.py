"""Read-only views of Kubernetes API objects, as the dicts the API returns.

The one home of the walks every layer makes over a ResourceClaim, a Pod and an object's metadata: a claim's
requests (``exactly`` or each ``firstAvailable`` subrequest, named as upstream's request accessor names them,
``request`` or ``request/subrequest``), the device classes they use, a pod's claim names, a claim's allocated
node and object references.

Objects stay plain dicts (decoded JSON) on purpose: the allocator and the caches handle tens of thousands of
them per second, and typed models would cost a copy per object. These functions never mutate what they are
given and tolerate malformed input (a missing or wrongly typed field reads as absent); validation, with errors
that name the field, is the API server's and :mod:`controller.sandbox.validation`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .nodeselector import selected_node_names


def _dict(v: Any) -> Mapping:
    return v if isinstance(v, Mapping) else {}


def _list(v: Any) -> list:
    return v if isinstance(v, list) else []


# --- metadata ---------------------------------------------------------------------------------------------

def name(obj: Mapping) -> str:
    return str(_dict(obj.get("metadata")).get("name") or "")


def namespace(obj: Mapping) -> str:
    return str(_dict(obj.get("metadata")).get("namespace") or "")


def uid(obj: Mapping) -> str:
    return str(_dict(obj.get("metadata")).get("uid") or "")


def key(obj: Mapping) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects): the cache and work-queue key."""
    ns = namespace(obj)
    return f"{ns}/{name(obj)}" if ns else name(obj)


def ref(obj: Mapping) -> str:
    """How messages name an object: ``Kind namespace/name``."""
    kind = obj.get("kind") or "object"
    return f"{kind} {key(obj)}"


def is_deleting(obj: Mapping) -> bool:
    return bool(_dict(obj.get("metadata")).get("deletionTimestamp"))


# --- ResourceClaim ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestSpec:
    """One allocatable request of a claim: an ``exactly`` request, or one subrequest of ``firstAvailable``."""

    #: ``request`` for exactly, ``request/subrequest`` for a subrequest (as allocation results name them)
    full_name: str
    #: the request's own name
    request: str
    #: the subrequest's name, None for ``exactly``
    subrequest: str | None
    #: the ExactDeviceRequest / DeviceSubRequest dict (deviceClassName, selectors, count, tolerations, ...)
    spec: Mapping
    #: its field path in the claim, for messages: ``spec.devices.requests[0].firstAvailable[1]``
    path: str


def device_requests(claim: Mapping) -> list[Mapping]:
    """``spec.devices.requests`` as given (the DeviceRequest dicts)."""
    return [r for r in _list(_dict(_dict(claim.get("spec")).get("devices")).get("requests")) if isinstance(r, Mapping)]


def request_specs(claim: Mapping) -> Iterator[RequestSpec]:
    """Every ``exactly`` request and every ``firstAvailable`` subrequest, in order. A request with both (invalid)
    yields both; one with neither yields nothing."""
    for i, r in enumerate(_list(_dict(_dict(claim.get("spec")).get("devices")).get("requests"))):
        if not isinstance(r, Mapping):
            continue
        rname = str(r.get("name") or "")
        if "exactly" in r:
            yield RequestSpec(rname, rname, None, _dict(r.get("exactly")), f"spec.devices.requests[{i}].exactly")
        for j, sub in enumerate(_list(r.get("firstAvailable"))):
            if isinstance(sub, Mapping):
                sname = str(sub.get("name") or "")
                yield RequestSpec(f"{rname}/{sname}", rname, sname, sub,
                                  f"spec.devices.requests[{i}].firstAvailable[{j}]")


def device_class_names(claim: Mapping) -> list[str]:
    """The deviceClassName of every request and subrequest, in order (duplicates kept, "" where unset)."""
    return [str(rs.spec.get("deviceClassName") or "") for rs in request_specs(claim)]


def device_configs(claim: Mapping) -> list[Mapping]:
    """``spec.devices.config`` as given (DeviceClaimConfiguration dicts)."""
    return [c for c in _list(_dict(_dict(claim.get("spec")).get("devices")).get("config")) if isinstance(c, Mapping)]


def allocation(claim: Mapping) -> Mapping | None:
    a = _dict(claim.get("status")).get("allocation")
    return a if isinstance(a, Mapping) else None


def allocated_results(claim: Mapping) -> list[Mapping]:
    """``status.allocation.devices.results``; empty when unallocated."""
    return [r for r in _list(_dict(_dict(allocation(claim)).get("devices")).get("results")) if isinstance(r, Mapping)]


def allocated_node(claim: Mapping) -> str | None:
    """The one node an allocation is pinned to (``matchFields metadata.name In [node]``, as allocators write
    it); None when unallocated, network-attached, or selecting by anything else or more than one node."""
    names = selected_node_names(_dict(allocation(claim)).get("nodeSelector"))
    return next(iter(names)) if names is not None and len(names) == 1 else None


def reserved_for(claim: Mapping) -> list[Mapping]:
    """``status.reservedFor`` consumer references."""
    return [r for r in _list(_dict(claim.get("status")).get("reservedFor")) if isinstance(r, Mapping)]


# --- Pod --------------------------------------------------------------------------------------------------

def pod_claim_names(pod: Mapping) -> list[str]:
    """The ResourceClaim names a pod uses, in ``spec.resourceClaims`` order: ``resourceClaimName`` where set,
    else the name the claim controller generated from the template (``status.resourceClaimStatuses``); an
    entry whose claim is not generated yet (or not needed) is left out (:func:`pod_claims` says which)."""
    return [pc.claim_name for pc in pod_claims(pod) if pc.claim_name]


def pod_claims_pending_generation(pod: Mapping) -> list[str]:
    """Pod claim entries (``spec.resourceClaims[].name``) from a template whose claim is not generated yet."""
    generated = {s.get("name") for s in _list(_dict(pod.get("status")).get("resourceClaimStatuses"))
                 if isinstance(s, Mapping)}
    return [str(rc.get("name") or "") for rc in _list(_dict(pod.get("spec")).get("resourceClaims"))
            if isinstance(rc, Mapping) and not rc.get("resourceClaimName") and rc.get("name") not in generated]


@dataclass(frozen=True)
class PodClaim:
    """One ``spec.resourceClaims`` entry of a pod and the ResourceClaim it names."""

    #: the entry's name in ``pod.spec.resourceClaims``
    pod_claim_name: str
    #: the ResourceClaim's name; None while the claim of a template is not generated (or is not needed)
    claim_name: str | None


def pod_claims(pod: Mapping) -> list[PodClaim]:
    """The claims a pod references, in order, as upstream's ``resourceclaim.Name`` resolves them: the
    ``resourceClaimName`` where set; for a ``resourceClaimTemplateName`` the name recorded in
    ``status.resourceClaimStatuses`` (None until then); an entry with neither (invalid) is left out."""
    generated = {s.get("name"): s.get("resourceClaimName")
                 for s in _list(_dict(pod.get("status")).get("resourceClaimStatuses")) if isinstance(s, Mapping)}
    out = []
    for rc in _list(_dict(pod.get("spec")).get("resourceClaims")):
        if not isinstance(rc, Mapping):
            continue
        entry = str(rc.get("name") or "")
        if isinstance(rc.get("resourceClaimName"), str) and rc["resourceClaimName"]:
            out.append(PodClaim(entry, rc["resourceClaimName"]))
        elif rc.get("resourceClaimTemplateName"):
            n = generated.get(rc.get("name"))
            out.append(PodClaim(entry, n if isinstance(n, str) and n else None))
    return out


def request_tolerations(claim: Mapping) -> list[list[Mapping]]:
    """The tolerations of every request and subrequest (:func:`request_specs` order), one list each."""
    return [[t for t in _list(rs.spec.get("tolerations")) if isinstance(t, Mapping)] for rs in request_specs(claim)]


def allocation_results(allocation: Mapping | None) -> list[Mapping]:
    """``devices.results`` of an AllocationResult (``status.allocation``); empty for None."""
    return [r for r in _list(_dict(_dict(allocation).get("devices")).get("results")) if isinstance(r, Mapping)]


def allocation_configs(allocation: Mapping | None) -> list[Mapping]:
    """``devices.config`` of an AllocationResult: DeviceAllocationConfiguration dicts (source, requests, opaque)."""
    return [c for c in _list(_dict(_dict(allocation).get("devices")).get("config")) if isinstance(c, Mapping)]


# --- added for the allocator (issue 17.4) -----------------------------------------------------------------

def malformed_requests(claim: Mapping) -> list[str]:
    """Field paths of ``spec.devices.requests`` entries that are not objects (which :func:`device_requests` and
    :func:`request_specs` skip), so that a validator can refuse them by name; "spec.devices.requests" itself
    when it is set but not a list."""
    raw = _dict(_dict(claim.get("spec")).get("devices")).get("requests")
    if raw is None:
        return []
    if not isinstance(raw, list):
        return ["spec.devices.requests"]
    return [f"spec.devices.requests[{i}]" for i, r in enumerate(raw) if not isinstance(r, Mapping)]
