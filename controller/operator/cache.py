"""What the controller knows of the cluster: the watched objects, and the devices claims hold.

Bookkeeping follows docs/architecture.md §4.6: allocated devices come from what the informers show, plus the
allocations this controller wrote that the informers have not shown yet (in flight) — never from memory
of writes alone. An in-flight allocation stays counted until the claim is seen with it, or is seen
without it at a newer resourceVersion than our write (then kube-scheduler's PostFilter, or someone,
cleared it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, NamedTuple

from controller.allocator import AllocatedState, SliceIndex
from driver.api import constants as C

from .holders import Holders
from .sharingmodes import ShareModes
from .taintrules import RuleState
from .claims import is_partita_class, is_pending, key, pod_claims
from .writer import ANNOTATION_NODE, ANNOTATION_POD

log = logging.getLogger(__name__)


def _rv(obj: Mapping) -> int:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Vanished(NamedTuple):
    """An allocation of ours that someone cleared while its pod still waits (kube-scheduler's PostFilter)."""

    claim: str           # claim key
    pod: str             # pod key
    node: str


@dataclass
class InFlight:
    allocation: dict
    write_rv: int
    node: str
    pod: str
    since: float


class Cache:
    def __init__(self, driver_name: str):
        self.driver = driver_name
        self.pods: dict[str, dict] = {}
        self.claims: dict[str, dict] = {}
        self.nodes: dict[str, dict] = {}
        self.classes: dict[str, dict] = {}
        self.namespaces: dict[str, dict] = {}           # namespace -> labels (affinity namespaceSelector)
        self.slices = SliceIndex()
        self.allocated = AllocatedState()
        self.holders = Holders(self.allocated)          # claims per device: a double allocation stays held
        self.share_modes = ShareModes(driver_name)      # sharing strategy of each allocated share
        self._accounted: dict[str, dict] = {}          # claim uid -> allocation counted in self.allocated
        self.inflight: dict[str, InFlight] = {}        # claim uid -> allocation we wrote
        self.pods_by_node: dict[str, set[str]] = {}
        self.claim_users: dict[str, set[str]] = {}     # claim key -> pod keys referencing it
        self.tainted_pools_missing: set[tuple[str, str]] = set()
        self.scheduler_mode_pools: set[tuple[str, str]] = set()
        self._vanished: list[Vanished] = []             # found while applying one event
        self.taint_rules = RuleState(self.classes)     # DeviceTaintRules, merged into the slices indexed

    # -- objects ------------------------------------------------------------------------------
    def apply(self, kind: str, etype: str, obj: dict) -> list[Vanished]:
        """Take in one watch event; returns the allocations of ours it showed cleared (usually none)."""
        self._vanished = []
        getattr(self, f"_on_{kind}")(etype, obj)
        return self._vanished

    def _on_pod(self, etype: str, pod: dict) -> None:
        k = key(pod)
        old = self.pods.get(k)
        if old is not None:
            self._unindex_pod(k, old)
        if etype == "DELETED":
            self.pods.pop(k, None)
            return
        self.pods[k] = pod
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            self.pods_by_node.setdefault(node, set()).add(k)
        ns = pod["metadata"].get("namespace", "")
        for pc in pod_claims(pod):
            if pc.claim_name:
                self.claim_users.setdefault(f"{ns}/{pc.claim_name}", set()).add(k)

    def _unindex_pod(self, k: str, pod: dict) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            self.pods_by_node.get(node, set()).discard(k)
        ns = pod["metadata"].get("namespace", "")
        for pc in pod_claims(pod):
            if pc.claim_name:
                self.claim_users.get(f"{ns}/{pc.claim_name}", set()).discard(k)

    def _on_claim(self, etype: str, claim: dict) -> None:
        k = key(claim)
        uid = claim["metadata"].get("uid", "")
        if etype == "DELETED":
            if (self.claims.get(k) or {}).get("metadata", {}).get("uid") == uid:
                self.claims.pop(k, None)
            self._account(uid, None)
            self.inflight.pop(uid, None)
            return
        old = self.claims.get(k)
        self.claims[k] = claim
        allocation = (claim.get("status") or {}).get("allocation")
        flight = self.inflight.get(uid)
        if flight is None and allocation is None and old is not None and (old.get("status") or {}).get("allocation"):
            self._cleared(k, claim)
        if flight is not None:
            if allocation is not None:
                self.inflight.pop(uid, None)              # the informer caught up (or someone else won)
            elif _rv(claim) > flight.write_rv:
                self.inflight.pop(uid, None)              # cleared after our write: PostFilter or a release
                self._vanished.append(Vanished(k, flight.pod, flight.node))
            else:
                allocation = flight.allocation            # an event older than our write
        self._account(uid, allocation, k)

    def _cleared(self, k: str, claim: dict) -> None:
        """An allocation disappeared. If it was ours and its pod still waits for a node, kube-scheduler's
        PostFilter cleared it (the node is unfit for the pod): report it, so the node is avoided."""
        md = claim["metadata"]
        annotations = md.get("annotations") or {}
        pod_key, node = annotations.get(ANNOTATION_POD), annotations.get(ANNOTATION_NODE)
        if C.CLAIM_FINALIZER not in (md.get("finalizers") or []) or not pod_key or not node:
            return
        pod = self.pods.get(pod_key)
        if pod is not None and is_pending(pod):
            self._vanished.append(Vanished(k, pod_key, node))

    def _account(self, uid: str, allocation: dict | None, claim_key: str = "") -> None:
        old = self._accounted.get(uid)
        if old == allocation:
            return
        if old is not None:
            self.holders.remove(uid, old)
            self.share_modes.add(old, -1)
            del self._accounted[uid]
        if allocation is not None:
            self.holders.add(uid, claim_key or uid, allocation)
            self.share_modes.add(allocation, 1)
            self._accounted[uid] = allocation

    def record_write(self, claim: dict, allocation: dict, write_rv: int, node: str, pod: str) -> None:
        uid = claim["metadata"]["uid"]
        cached = self.claims.get(key(claim))
        if cached is not None and cached["metadata"].get("uid") == uid and _rv(cached) >= write_rv:
            # The watch delivered our write, and maybe what followed it (kube-scheduler clearing it, reported
            # then as vanished), before the write's own response was handled: the cache is current already.
            # Kept in flight now, no later event would end the entry, and the claim would look allocated to
            # the worker until the entry expired a minute later.
            return
        self.inflight[uid] = InFlight(allocation, write_rv, node, pod, time.monotonic())
        self._account(uid, allocation, key(claim))

    def expire_inflight(self, max_age: float = 60.0) -> None:
        now = time.monotonic()
        for uid, f in list(self.inflight.items()):
            if now - f.since > max_age:
                del self.inflight[uid]
                claim = next((c for c in self.claims.values() if c["metadata"].get("uid") == uid), None)
                self._account(uid, ((claim or {}).get("status") or {}).get("allocation"), key(claim) if claim else uid)

    def _on_node(self, etype: str, node: dict) -> None:
        if etype == "DELETED":
            self.nodes.pop(node["metadata"]["name"], None)
        else:
            self.nodes[node["metadata"]["name"]] = node

    def _on_namespace(self, etype: str, ns: dict) -> None:
        if etype == "DELETED":
            self.namespaces.pop(ns["metadata"]["name"], None)
        else:
            self.namespaces[ns["metadata"]["name"]] = dict(ns["metadata"].get("labels") or {})

    def _on_deviceclass(self, etype: str, cls: dict) -> None:
        if etype == "DELETED":
            self.classes.pop(cls["metadata"]["name"], None)
        else:
            self.classes[cls["metadata"]["name"]] = cls

    def _on_slice(self, etype: str, s: dict) -> None:
        spec = s.get("spec") or {}
        name = s["metadata"]["name"]
        if spec.get("driver") != self.driver:
            return
        pid = (spec.get("driver", ""), (spec.get("pool") or {}).get("name", ""))
        self.taint_rules.track(etype, s)
        if etype == "DELETED":
            self.slices.delete(name)
            return
        mode = (s["metadata"].get("labels") or {}).get(C.SLICE_ALLOCATION_MODE_LABEL)
        if mode != C.ALLOCATION_MODE_CONTROLLER:
            self.slices.delete(name)
            self.scheduler_mode_pools.add(pid)
            return
        self.scheduler_mode_pools.discard(pid)
        untainted = [d["name"] for d in spec.get("devices") or []
                     if not any(t.get("key") == C.MANAGED_TAINT_KEY for t in d.get("taints") or [])]
        if untainted:
            # The driver meant these for the controller, but the API server dropped the taint: kube-scheduler
            # could hand them out too. Never allocate them (never two allocators for one device).
            self.slices.delete(name)
            if pid not in self.tainted_pools_missing:
                self.tainted_pools_missing.add(pid)
                log.error("ResourceSlice %s of pool %s/%s is labelled %s=controller but %d device(s) lack the %s "
                          "taint (the API server dropped it: is the DRADeviceTaints feature gate on?); Partita will "
                          "not allocate from this pool", name, pid[0], pid[1], C.SLICE_ALLOCATION_MODE_LABEL,
                          len(untainted), C.MANAGED_TAINT_KEY)
            return
        self.tainted_pools_missing.discard(pid)
        self.slices.upsert(self.taint_rules.patch(s))

    def _on_devicetaintrule(self, etype: str, rule: dict) -> None:
        for s in self.taint_rules.on_rule(etype, rule):
            self._on_slice("MODIFIED", dict(s))

    # -- queries ------------------------------------------------------------------------------
    def partita_classes(self) -> set[str]:
        return {n for n, c in self.classes.items() if is_partita_class(c, self.driver)}

    def claim_by_name(self, namespace: str, name: str) -> dict | None:
        return self.claims.get(f"{namespace}/{name}")

    def pods_on(self, node: str) -> list[dict]:
        return [self.pods[k] for k in self.pods_by_node.get(node, ()) if k in self.pods
                and (self.pods[k].get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
