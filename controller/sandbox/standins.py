"""Stand-ins for the control-plane parts the sandbox has no real copy of.

* :class:`ClaimController` — kube-controller-manager's resourceclaim controller: creates a pod's claims
  from its ResourceClaimTemplates (owned by the pod, named ``<pod>-<claim>-<random>``), records them in
  ``pod.status.resourceClaimStatuses``, and drops consumers that are gone from ``reservedFor``.
* :class:`Binder` — kube-scheduler's last steps for pods whose claims Partita allocated: it checks the
  pod still fits the node (otherwise it clears the allocations, as the scheduler's PostFilter does),
  adds the pod to each claim's ``reservedFor``, and binds the pod.

Both work on the emulator's store directly; each ``sync()`` is one level-triggered pass.
"""

from __future__ import annotations

import copy
import logging

from controller.operator.claims import is_pending
from controller.operator.nodefit import NodeInfo, Topology, fit
from driver.api.objects import allocated_node, allocation, key, pod_claim_names

from .apiserver import ApiError, ApiServer
from .kubelet import FINALIZER as KUBELET_FINALIZER

log = logging.getLogger(__name__)
POD_CLAIM_NAME_ANNOTATION = "resource.kubernetes.io/pod-claim-name"
MAX_CONSUMERS = 256


class ClaimController:
    def __init__(self, server: ApiServer):
        self.server = server
        self.problems: dict[str, str] = {}    # pod key -> why its claims cannot be created

    def sync(self) -> None:
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self.server.list("pods")}
        for pod in pods.values():
            if is_pending(pod):
                self._create_claims(pod)
        for claim in self.server.list("resourceclaims", group="resource.k8s.io"):
            self._drop_gone_consumers(claim, pods)
            self._delete_if_done(claim, pods)

    def _create_claims(self, pod: dict) -> None:
        md = pod["metadata"]
        ns, k = md["namespace"], key(pod)
        statuses = list((pod.get("status") or {}).get("resourceClaimStatuses") or [])
        known = {s.get("name") for s in statuses}
        added = False
        for rc in (pod.get("spec") or {}).get("resourceClaims") or []:
            template_name = rc.get("resourceClaimTemplateName")
            if not template_name or rc.get("name") in known:
                continue
            template = self.server.get("resourceclaimtemplates", template_name, ns, group="resource.k8s.io")
            if template is None:
                self.problems[k] = f"ResourceClaimTemplate {ns}/{template_name} not found"
                continue
            tmd = (template.get("spec") or {}).get("metadata") or {}
            claim = {
                "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {
                    "generateName": f"{md['name']}-{rc['name']}-"[:58], "namespace": ns,
                    "labels": dict(tmd.get("labels") or {}),
                    "annotations": {**(tmd.get("annotations") or {}), POD_CLAIM_NAME_ANNOTATION: rc["name"]},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": md["name"], "uid": md["uid"],
                                         "controller": True, "blockOwnerDeletion": True}],
                },
                "spec": copy.deepcopy((template.get("spec") or {}).get("spec") or {}),
            }
            created = self.server.create(claim)
            statuses.append({"name": rc["name"], "resourceClaimName": created["metadata"]["name"]})
            added = True
        if added:
            self.problems.pop(k, None)
            fresh = self.server.get("pods", md["name"], ns)
            if fresh is not None:
                fresh["status"] = {**(fresh.get("status") or {}), "resourceClaimStatuses": statuses}
                self.server.update_status(fresh)

    def _drop_gone_consumers(self, claim: dict, pods: dict) -> None:
        status = claim.get("status") or {}
        reserved = status.get("reservedFor") or []
        ns = claim["metadata"]["namespace"]
        keep = []
        for ref in reserved:
            pod = pods.get((ns, ref.get("name")))
            if ref.get("resource") == "pods" and (pod is None or pod["metadata"].get("uid") != ref.get("uid")
                                                  or _done(pod)):
                continue
            keep.append(ref)
        if len(keep) != len(reserved):
            claim["status"] = {**status, "reservedFor": keep}
            if not keep:
                del claim["status"]["reservedFor"]
            try:
                self.server.update_status(claim)
            except ApiError as e:
                log.debug("claim %s/%s: %s", ns, claim["metadata"]["name"], e)


    def _delete_if_done(self, claim: dict, pods: dict) -> None:
        """A claim generated for a pod that finished (and no one else reserves) is deleted, as upstream's
        resourceclaim controller does: the pod will not need it again."""
        md = claim["metadata"]
        if md.get("deletionTimestamp") or (claim.get("status") or {}).get("reservedFor"):
            return
        owner = next((o for o in md.get("ownerReferences") or [] if o.get("kind") == "Pod" and o.get("controller")),
                     None)
        pod = pods.get((md["namespace"], owner.get("name"))) if owner else None
        if pod is None or pod["metadata"].get("uid") != owner.get("uid") or not _done(pod):
            return
        try:
            self.server.delete("resourceclaims", md["name"], md["namespace"], group="resource.k8s.io")
        except ApiError as e:
            log.debug("claim %s/%s: %s", md["namespace"], md["name"], e)


def _done(pod: dict) -> bool:
    """The pod finished, and the kubelet stand-in has unprepared its claims (it drops its finalizer then):
    only then are its devices free for others, as on a node where the kubelet unprepares before the pod
    counts as gone."""
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") \
        and KUBELET_FINALIZER not in (pod["metadata"].get("finalizers") or [])


class Binder:
    def __init__(self, server: ApiServer):
        self.server = server
        self.cleared = 0          # allocations cleared because the pod did not fit (PostFilter)

    def sync(self) -> None:
        nodes = {n["metadata"]["name"]: n for n in self.server.list("nodes")}
        pods = self.server.list("pods")
        for pod in pods:
            if is_pending(pod):
                self._schedule(pod, nodes, pods)

    def _schedule(self, pod: dict, nodes: dict, pods: list[dict]) -> None:
        md = pod["metadata"]
        ns = md["namespace"]
        refs = (pod.get("spec") or {}).get("resourceClaims") or []
        names = pod_claim_names(pod)
        if len(names) != len(refs):
            return       # claims from templates not created yet
        claims = [self.server.get("resourceclaims", n, ns, group="resource.k8s.io") for n in names]
        if any(c is None or not allocation(c) for c in claims):
            return       # Partita has not allocated them (yet)
        targets = {allocated_node(c) for c in claims}
        if not claims:
            return       # pods without claims are not part of the sandbox
        if len(targets) != 1 or None in targets:
            log.warning("pod %s/%s: its claims are allocated on different nodes %s", ns, md["name"], sorted(map(str, targets)))
            return
        node = targets.pop()
        if node not in nodes:
            return
        infos = [NodeInfo(n, [p for p in pods if (p.get("spec") or {}).get("nodeName") == name
                              and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")])
                 for name, n in nodes.items()]
        info = next(i for i in infos if i.name == node)
        namespaces = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in self.server.list("namespaces")}
        why = fit(pod, info, Topology(infos, namespaces))
        if why:
            self._post_filter(pod, claims, node, why)
            return
        for c in claims:
            status = c.get("status") or {}
            reserved = list(status.get("reservedFor") or [])
            if any(r.get("uid") == md["uid"] for r in reserved):
                continue
            if len(reserved) >= MAX_CONSUMERS:
                return
            reserved.append({"resource": "pods", "name": md["name"], "uid": md["uid"]})
            c["status"] = {**status, "reservedFor": reserved}
            try:
                self.server.update_status(c)
            except ApiError as e:
                log.debug("reserving %s/%s: %s", ns, c["metadata"]["name"], e)
                return
        try:
            self.server.bind(ns, md["name"], node)
        except ApiError as e:
            log.debug("binding %s/%s: %s", ns, md["name"], e)

    def _post_filter(self, pod: dict, claims: list[dict], node: str, why: str) -> None:
        log.info("pod %s/%s does not fit node %s (%s): clearing its unreserved allocations",
                 pod["metadata"]["namespace"], pod["metadata"]["name"], node, why)
        for c in claims:
            status = c.get("status") or {}
            if status.get("reservedFor"):
                continue
            c["status"] = {k: v for k, v in status.items() if k not in ("allocation", "devices")}
            try:
                self.server.update_status(c)
                self.cleared += 1
            except ApiError as e:
                log.debug("clearing %s: %s", c["metadata"]["name"], e)
