"""Writing allocations and releasing them, as kube-scheduler does (controller-mode notes §1, §3).

Allocating takes two calls, each with a resourceVersion precondition: an Update that adds Partita's
finalizer (and records which pod and node the allocation is for), then an UpdateStatus that writes the
whole allocation including allocationTimestamp. The first is based on the claim as the cache showed it
when the allocation was decided (its resourceVersion is the precondition: if the claim changed since,
the write gets 409 and the controller decides again on newer data). Releasing is an UpdateStatus that
clears the allocation only while reservedFor is empty (re-checked on the object the write is based on),
then an Update that removes the finalizer.

Every write passes the leader fence first (``leader.py``): ``fence.check`` immediately before each write,
``fence.confirm`` (the Lease re-read) before the writes that hand out or free devices.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

from driver.api import constants as C
from driver.api.kube import Kube, KubeError, claim_path
from driver.errors import PartitaError

from .leader import NO_FENCE, Fence

ANNOTATION_POD = "partita.dev/allocated-for-pod"
ANNOTATION_NODE = "partita.dev/allocated-node"


class Lost(PartitaError):
    """The claim changed under us in a way that ends this attempt (allocated by someone else, deleted,
    or reserved meanwhile); the caller re-reads and re-decides."""


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_timestamp(allocation: dict) -> dict:
    a = copy.deepcopy(allocation)
    a["allocationTimestamp"] = _stamp()
    return a


async def write_allocation(kube: Kube, cached: dict, allocation: dict, pod_key: str, node: str,
                           fence: Fence = NO_FENCE) -> dict:
    """Finalizer, then status, based on the claim as cached (``cached``, not modified). Returns the stored
    claim. Raises Lost, NotLeader, or KubeError (409 = the claim changed since: decide again)."""
    claim = copy.deepcopy(cached)
    namespace, name = claim["metadata"].get("namespace", ""), claim["metadata"]["name"]
    if (claim.get("status") or {}).get("allocation"):
        raise Lost(f"claim {namespace}/{name} was allocated meanwhile")
    if claim["metadata"].get("deletionTimestamp"):
        raise Lost(f"claim {namespace}/{name} is being deleted")
    md = claim["metadata"]
    finalizers = list(md.get("finalizers") or [])
    annotations = dict(md.get("annotations") or {})
    changed = False
    if C.CLAIM_FINALIZER not in finalizers:
        finalizers.append(C.CLAIM_FINALIZER)
        changed = True
    if annotations.get(ANNOTATION_POD) != pod_key or annotations.get(ANNOTATION_NODE) != node:
        annotations[ANNOTATION_POD] = pod_key
        annotations[ANNOTATION_NODE] = node
        changed = True
    if changed:
        md["finalizers"] = finalizers
        md["annotations"] = annotations
        fence.check(f"the finalizer of claim {namespace}/{name}")
        claim = await kube.replace(claim_path(namespace, name), claim)
    claim["status"] = {**(claim.get("status") or {}), "allocation": with_timestamp(allocation)}
    try:
        await fence.confirm(f"the allocation of claim {namespace}/{name}")
        return await kube.replace(claim_path(namespace, name, status=True), claim)
    except KubeError as e:
        if e.invalid:
            raise Lost(f"claim {namespace}/{name}: the API server refused the allocation ({e.message})") from None
        raise


async def release(kube: Kube, claim: dict[str, Any], fence: Fence = NO_FENCE) -> dict | None:
    """Clear the allocation (if reservedFor is empty) and drop the finalizer. Returns the claim after,
    or None when it is gone. Raises Lost if it is in use, KubeError on conflicts."""
    md = claim["metadata"]
    path_ns, name = md.get("namespace", ""), md["name"]
    status = claim.get("status") or {}
    if status.get("reservedFor"):
        raise Lost(f"claim {path_ns}/{name} is reserved for {len(status['reservedFor'])} consumer(s)")
    if status.get("allocation"):
        body = copy.deepcopy(claim)
        body["status"] = {k: v for k, v in status.items() if k not in ("allocation", "reservedFor", "devices")}
        await fence.confirm(f"the release of claim {path_ns}/{name}")
        claim = await kube.replace(claim_path(path_ns, name, status=True), body)
    return await remove_finalizer(kube, claim, fence)


async def remove_finalizer(kube: Kube, claim: dict, fence: Fence = NO_FENCE) -> dict | None:
    md = claim["metadata"]
    if C.CLAIM_FINALIZER not in (md.get("finalizers") or []):
        return claim
    body = copy.deepcopy(claim)
    body["metadata"]["finalizers"] = [f for f in md.get("finalizers") or [] if f != C.CLAIM_FINALIZER]
    annotations = {k: v for k, v in (md.get("annotations") or {}).items() if k not in (ANNOTATION_POD, ANNOTATION_NODE)}
    body["metadata"]["annotations"] = annotations
    try:
        fence.check(f"the finalizer removal of claim {md.get('namespace', '')}/{md['name']}")
        return await kube.replace(claim_path(md.get("namespace", ""), md["name"]), body)
    except KubeError as e:
        if e.not_found:
            return None
        raise
