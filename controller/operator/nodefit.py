"""Does a pod fit a node? kube-scheduler's filters, as pure functions (ARCHITECTURE §4.3).

The controller must be at least as strict as kube-scheduler: if it picked a node the scheduler's
filters reject, the scheduler's PostFilter would clear the allocation. Each filter returns ``""`` when the
pod fits, else a short reason. Implemented: NodeUnschedulable, NodeName, NodeSelector/NodeAffinity
(required), TaintToleration (NoSchedule/NoExecute), NodeResourcesFit (requests incl. init containers and
overhead, pod count, extended resources), NodePorts, InterPodAffinity (required affinity and
anti-affinity, both directions for anti-affinity), PodTopologySpread (DoNotSchedule constraints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from controller.allocator.nodeselector import node_matches
from controller.allocator.types import Node
from driver.api.quantity import Quantity, QuantityError

TERMINAL = ("Succeeded", "Failed")


@dataclass
class NodeInfo:
    """A node plus the pods bound (or about to be bound) to it."""

    obj: Mapping
    pods: list[Mapping] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def labels(self) -> Mapping[str, str]:
        return self.obj["metadata"].get("labels") or {}

    def as_node(self) -> Node:
        return Node(self.name, dict(self.labels))


def _q(v: object) -> Quantity:
    try:
        return Quantity.parse(v)  # type: ignore[arg-type]
    except QuantityError:
        return Quantity.parse(0)


def pod_requests(pod: Mapping) -> dict[str, Quantity]:
    """Effective requests: max(sum of containers, each init container) plus overhead; a container
    with limits but no requests requests its limits (as the API server defaults)."""
    spec = pod.get("spec") or {}

    def reqs(c: Mapping) -> dict[str, Quantity]:
        res = c.get("resources") or {}
        out = {k: _q(v) for k, v in (res.get("limits") or {}).items()}
        out.update({k: _q(v) for k, v in (res.get("requests") or {}).items()})
        return out

    total: dict[str, Quantity] = {}
    for c in spec.get("containers") or []:
        for k, v in reqs(c).items():
            total[k] = total.get(k, Quantity.parse(0)) + v
    for c in spec.get("initContainers") or []:
        for k, v in reqs(c).items():
            if v > total.get(k, Quantity.parse(0)):
                total[k] = v
    for k, v in (spec.get("overhead") or {}).items():
        total[k] = total.get(k, Quantity.parse(0)) + _q(v)
    return total


def unschedulable(pod: Mapping, node: NodeInfo) -> str:
    if not (node.obj.get("spec") or {}).get("unschedulable"):
        return ""
    taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    if any(tolerates(t, taint) for t in (pod.get("spec") or {}).get("tolerations") or []):
        return ""
    return "node is unschedulable (cordoned)"


def node_name(pod: Mapping, node: NodeInfo) -> str:
    want = (pod.get("spec") or {}).get("nodeName")
    return "" if not want or want == node.name else f"pod asks for node {want}"


def node_selector(pod: Mapping, node: NodeInfo) -> str:
    for k, v in ((pod.get("spec") or {}).get("nodeSelector") or {}).items():
        if node.labels.get(k) != v:
            return f"node label {k}={v} missing (pod nodeSelector)"
    return ""


def node_affinity(pod: Mapping, node: NodeInfo) -> str:
    required = (((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return ""
    if node_matches(node.as_node(), required):
        return ""
    return "node does not match the pod's required node affinity"


def tolerates(toleration: Mapping, taint: Mapping) -> bool:
    """core/v1 toleration semantics."""
    if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
        return False
    op = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return op == "Exists"
    if toleration.get("key") != taint.get("key"):
        return False
    if op == "Exists":
        return True
    return (toleration.get("value") or "") == (taint.get("value") or "")


def taints(pod: Mapping, node: NodeInfo) -> str:
    tols = (pod.get("spec") or {}).get("tolerations") or []
    for t in (node.obj.get("spec") or {}).get("taints") or []:
        if t.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(tolerates(x, t) for x in tols):
            value = f"={t['value']}" if t.get("value") else ""
            return f"untolerated taint {t.get('key')}{value}:{t.get('effect')}"
    return ""


def resources(pod: Mapping, node: NodeInfo) -> str:
    alloc = (node.obj.get("status") or {}).get("allocatable") or {}
    want = pod_requests(pod)
    used: dict[str, Quantity] = {}
    for p in node.pods:
        for k, v in pod_requests(p).items():
            used[k] = used.get(k, Quantity.parse(0)) + v
    if "pods" in alloc and len(node.pods) + 1 > _q(alloc["pods"]).as_int():
        return f"too many pods ({len(node.pods)} of {alloc['pods']} already)"
    for k, v in want.items():
        if v.sign() <= 0:
            continue
        if k not in alloc:
            if k in ("cpu", "memory", "ephemeral-storage"):
                continue   # a node that does not report it: as kube-scheduler, nothing to check against
            return f"node has no {k}"
        free = _q(alloc[k]) - used.get(k, Quantity.parse(0))
        if v > free:
            return f"insufficient {k} (requested {v}, free {free})"
    return ""


def _host_ports(pod: Mapping) -> set[tuple[str, str, int]]:
    out = set()
    spec = pod.get("spec") or {}
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.add((p.get("hostIP") or "0.0.0.0", p.get("protocol") or "TCP", int(p["hostPort"])))
    return out


def host_ports(pod: Mapping, node: NodeInfo) -> str:
    want = _host_ports(pod)
    if not want:
        return ""
    for p in node.pods:
        for ip, proto, port in _host_ports(p):
            for wip, wproto, wport in want:
                if proto == wproto and port == wport and (ip == wip or "0.0.0.0" in (ip, wip)):
                    return (f"host port {port}/{proto} is in use by pod "
                            f"{p['metadata'].get('namespace')}/{p['metadata']['name']}")
    return ""


# -- inter-pod affinity and topology spread ----------------------------------------------------------
def _selector_matches(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        present = key in labels
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and present and labels.get(key) in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _term_matches_pod(term: Mapping, owner_ns: str, pod: Mapping) -> bool:
    namespaces = term.get("namespaces") or []
    ns = pod["metadata"].get("namespace", "")
    if term.get("namespaceSelector") is not None:
        pass  # namespace labels are not cached; namespaces listed explicitly or the pod's own are used
    elif namespaces:
        if ns not in namespaces:
            return False
    elif ns != owner_ns:
        return False
    return _selector_matches(term.get("labelSelector"), pod["metadata"].get("labels") or {})


def _domain(node: NodeInfo, key: str) -> str | None:
    return node.labels.get(key)


class Topology:
    """Pods per node for affinity and spread decisions."""

    def __init__(self, nodes: Sequence[NodeInfo]):
        self.nodes = list(nodes)

    def pods_in_domain(self, key: str, value: str) -> Iterable[Mapping]:
        for n in self.nodes:
            if n.labels.get(key) == value:
                yield from n.pods


def inter_pod_affinity(pod: Mapping, node: NodeInfo, topo: Topology) -> str:
    ns = pod["metadata"].get("namespace", "")
    affinity = (pod.get("spec") or {}).get("affinity") or {}
    for term in ((affinity.get("podAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []):
        key = term.get("topologyKey", "")
        value = _domain(node, key)
        matching = [p for n in topo.nodes for p in n.pods if _term_matches_pod(term, ns, p)]
        if not matching and _selector_matches(term.get("labelSelector"), pod["metadata"].get("labels") or {}):
            continue   # the first pod of a group may match its own affinity
        if value is None or not any(_term_matches_pod(term, ns, p) for p in topo.pods_in_domain(key, value)):
            return f"required pod affinity ({key}) not satisfied"
    for term in ((affinity.get("podAntiAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution") or []):
        key = term.get("topologyKey", "")
        value = _domain(node, key)
        if value is not None and any(_term_matches_pod(term, ns, p) for p in topo.pods_in_domain(key, value)):
            return f"required pod anti-affinity ({key}) not satisfied"
    # existing pods' anti-affinity against this pod
    labels = pod["metadata"].get("labels") or {}
    for n in topo.nodes:
        for p in n.pods:
            anti = (((p.get("spec") or {}).get("affinity") or {}).get("podAntiAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution") or []
            for term in anti:
                key = term.get("topologyKey", "")
                if n.labels.get(key) is None or n.labels.get(key) != node.labels.get(key):
                    continue
                fake = {"metadata": {"namespace": ns, "labels": labels}}
                if _term_matches_pod(term, p["metadata"].get("namespace", ""), fake):
                    return f"pod {p['metadata'].get('namespace')}/{p['metadata']['name']} has anti-affinity against it ({key})"
    return ""


def topology_spread(pod: Mapping, node: NodeInfo, topo: Topology) -> str:
    ns = pod["metadata"].get("namespace", "")
    for c in (pod.get("spec") or {}).get("topologySpreadConstraints") or []:
        if c.get("whenUnsatisfiable", "DoNotSchedule") != "DoNotSchedule":
            continue
        key = c.get("topologyKey", "")
        if key not in node.labels:
            return f"node lacks topology label {key}"
        counts: dict[str, int] = {}
        for n in topo.nodes:
            if key not in n.labels:
                continue
            counts.setdefault(n.labels[key], 0)
            counts[n.labels[key]] += sum(1 for p in n.pods if p["metadata"].get("namespace") == ns and
                                         _selector_matches(c.get("labelSelector"), p["metadata"].get("labels") or {}))
        self_match = 1 if _selector_matches(c.get("labelSelector"), pod["metadata"].get("labels") or {}) else 0
        skew = counts.get(node.labels[key], 0) + self_match - min(counts.values(), default=0)
        if skew > int(c.get("maxSkew", 1)):
            return f"topology spread on {key} would have skew {skew} > maxSkew {c.get('maxSkew', 1)}"
    return ""


FILTERS = (node_name, unschedulable, node_selector, node_affinity, taints, resources, host_ports)


def fit(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    """"" when the pod fits the node, else the first reason it does not."""
    for f in FILTERS:
        why = f(pod, node)
        if why:
            return why
    if topo is not None:
        for f in (inter_pod_affinity, topology_spread):
            why = f(pod, node, topo)
            if why:
                return why
    return ""
