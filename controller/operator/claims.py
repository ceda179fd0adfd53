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

# the walks over claims and pods live in driver/api/objects.py; these names are re-exported for the
# controller's modules that import them from here
from driver.api.objects import PodClaim, allocated_node, device_class_names, key, pod_claims

__all__ = ["Ownership", "PodClaim", "allocated_node", "is_done", "is_partita_class", "is_pending", "key",
           "ownership", "pod_claims"]


def is_partita_class(cls: Mapping, driver_name: str) -> bool:
    for sel in (cls.get("spec") or {}).get("selectors") or []:
        expr = (sel.get("cel") or {}).get("expression") or ""
        if f"'{driver_name}'" in expr or f'"{driver_name}"' in expr:
            return True
    return False


@dataclass(frozen=True)
class Ownership:
    ours: bool
    mixed: bool          # some requests use Partita classes, others don't


def ownership(claim: Mapping, partita_classes: set[str]) -> Ownership:
    classes = device_class_names(claim)
    if not classes:
        return Ownership(False, False)
    mine = [c in partita_classes for c in classes]
    return Ownership(all(mine), any(mine) and not all(mine))


def is_pending(pod: Mapping) -> bool:
    md, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    return (not spec.get("nodeName") and not md.get("deletionTimestamp")
            and status.get("phase", "Pending") == "Pending")


def is_done(pod: Mapping | None) -> bool:
    """Gone, finished, or being deleted after it stopped: its claims can be released."""
    if pod is None:
        return True
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
