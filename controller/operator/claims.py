"""Which claims are Partita's, and which claims a pod uses.

A DeviceClass is Partita's when one of its CEL selectors names the driver as a string literal
(``device.driver == 'gpu.partita.dev'``, as every shipped class does). A claim is Partita's when every
request (and every firstAvailable subrequest) uses a Partita class: in controller mode kube-scheduler
cannot allocate Partita's tainted devices, and Partita never allocates another driver's devices, so a
claim that mixes drivers can be allocated by neither and gets an Event saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


def is_partita_class(cls: Mapping, driver_name: str) -> bool:
    for sel in (cls.get("spec") or {}).get("selectors") or []:
        expr = (sel.get("cel") or {}).get("expression") or ""
        if f"'{driver_name}'" in expr or f'"{driver_name}"' in expr:
            return True
    return False


def request_classes(claim: Mapping) -> list[str]:
    out = []
    for r in ((claim.get("spec") or {}).get("devices") or {}).get("requests") or []:
        if "exactly" in r:
            out.append((r["exactly"] or {}).get("deviceClassName", ""))
        for sub in r.get("firstAvailable") or []:
            out.append(sub.get("deviceClassName", ""))
    return out


@dataclass(frozen=True)
class Ownership:
    ours: bool
    mixed: bool          # some requests use Partita classes, others don't


def ownership(claim: Mapping, partita_classes: set[str]) -> Ownership:
    classes = request_classes(claim)
    if not classes:
        return Ownership(False, False)
    mine = [c in partita_classes for c in classes]
    return Ownership(all(mine), any(mine) and not all(mine))


@dataclass(frozen=True)
class PodClaim:
    pod_claim_name: str          # the name in pod.spec.resourceClaims
    claim_name: str | None       # the ResourceClaim's name; None while the template's claim is not created


def pod_claims(pod: Mapping) -> list[PodClaim]:
    """The claims a pod references, resolving templates through pod.status.resourceClaimStatuses."""
    statuses = {s.get("name"): s.get("resourceClaimName")
                for s in ((pod.get("status") or {}).get("resourceClaimStatuses") or [])}
    out = []
    for rc in (pod.get("spec") or {}).get("resourceClaims") or []:
        name = rc.get("name", "")
        if rc.get("resourceClaimName"):
            out.append(PodClaim(name, rc["resourceClaimName"]))
        elif rc.get("resourceClaimTemplateName"):
            out.append(PodClaim(name, statuses.get(name)))
    return out


def is_pending(pod: Mapping) -> bool:
    md, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    return (not spec.get("nodeName") and not md.get("deletionTimestamp")
            and status.get("phase", "Pending") == "Pending")


def is_done(pod: Mapping | None) -> bool:
    """Gone, finished, or being deleted after it stopped: its claims can be released."""
    if pod is None:
        return True
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def allocated_node(claim: Mapping) -> str | None:
    sel = (((claim.get("status") or {}).get("allocation") or {}).get("nodeSelector") or {})
    for term in sel.get("nodeSelectorTerms") or []:
        for f in term.get("matchFields") or []:
            if f.get("key") == "metadata.name" and f.get("operator") == "In" and f.get("values"):
                return f["values"][0]
    return None


def key(obj: Mapping) -> str:
    md = obj.get("metadata") or {}
    return f"{md.get('namespace', '')}/{md.get('name', '')}"
