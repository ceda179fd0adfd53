"""Does a pod fit a node? kube-scheduler's Filter plugins, as pure functions (docs/architecture.md §4.3).

The controller must be at least as strict as kube-scheduler: if it picked a node the scheduler's
filters reject, the scheduler's PostFilter would clear the allocation; and it must never reject a node
the scheduler admits. Each filter returns ``""`` when the pod fits, else a short reason. The filters
follow upstream's plugins (pkg/scheduler/framework/plugins, Kubernetes 1.34-1.36), checked against
their own test tables translated into tests/fixtures/nodefit/:

* NodeName, NodeUnschedulable, NodeAffinity (nodeSelector and required node affinity);
* TaintToleration: NoSchedule/NoExecute taints; Equal, Exists and the numeric Gt/Lt operators;
* NodeResourcesFit: pod count, cpu/memory/ephemeral-storage/extended resources; a pod's requests are
  the sum of its containers, at least each init container (plus the restartable sidecars started before
  it), with every sidecar added, pod-level requests where set, plus overhead; a node's allocatable it
  does not list counts as 0;
* NodePorts: hostIP/protocol/port conflicts (0.0.0.0 conflicts with every address);
* InterPodAffinity: required affinity (incl. the first pod of a group that matches its own terms) and
  anti-affinity, both the incoming pod's and the existing pods' (symmetry); namespaces and
  namespaceSelector;
* PodTopologySpread: DoNotSchedule constraints; the global minimum is taken over the nodes the
  constraint's nodeAffinityPolicy (default Honor) and nodeTaintsPolicy (default Ignore) include and that
  carry every constraint's topology key; minDomains; matchLabelKeys; terminating pods do not count.

Where the controller cannot judge a rule as upstream does (a namespaceSelector when namespace labels are
unknown), the filter rejects the node and its reason names the rule: stricter, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from controller.allocator.types import Node
from driver.api.naming import is_label_value
from driver.api.nodeselector import node_matches_lazily
from driver.api.quantity import Quantity, QuantityError
from driver.errors import PartitaError

TERMINAL = ("Succeeded", "Failed")
_ZERO = Quantity.parse(0)


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

    @property
    def taints(self) -> list[Mapping]:
        return list((self.obj.get("spec") or {}).get("taints") or [])

    def as_node(self) -> Node:
        return Node(self.name, dict(self.labels))


class Topology:
    """All nodes with their pods, and (when known) the namespaces' labels, for the filters that look
    beyond one node (InterPodAffinity, PodTopologySpread). A snapshot: build a new one when pods move."""

    def __init__(self, nodes: Sequence[NodeInfo], namespaces: Mapping[str, Mapping[str, str]] | None = None):
        self.nodes = list(nodes)
        #: namespace name -> labels; None: unknown (a namespaceSelector cannot be judged)
        self.namespaces = namespaces
        self._memo: dict[str, tuple[Mapping, object]] = {}

    def memo(self, what: str, pod: Mapping, compute: Callable[[], object]) -> object:
        """What upstream computes once per pod in PreFilter (counts over every node), computed once per
        (topology, pod) here: the filters then judge each node in constant time."""
        got = self._memo.get(what)
        if got is not None and got[0] is pod:
            return got[1]
        try:
            value = compute()
        except CannotJudge as e:
            value = e
        self._memo[what] = (pod, value)
        return value


class CannotJudge(PartitaError):
    """A rule the controller cannot evaluate as kube-scheduler would; the node is rejected with this reason."""


# -- helpers -----------------------------------------------------------------------------------------
def _spec(pod: Mapping) -> Mapping:
    return pod.get("spec") or {}


def _md(pod: Mapping) -> Mapping:
    return pod.get("metadata") or {}


def _ns(pod: Mapping) -> str:
    return _md(pod).get("namespace") or ""


def _labels(pod: Mapping) -> Mapping[str, str]:
    return _md(pod).get("labels") or {}


def _ref(pod: Mapping) -> str:
    return f"{_ns(pod)}/{_md(pod).get('name', '?')}"


def _q(v: object) -> Quantity:
    try:
        return Quantity.parse(v)  # type: ignore[arg-type]
    except QuantityError:
        return Quantity.parse(0)


def selector_matches(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector: None selects nothing, ``{}`` everything; requirements are ANDed."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        present = key in labels
        if op == "In":
            if not present or labels.get(key) not in values:
                return False
        elif op == "NotIn":
            if present and labels.get(key) in values:
                return False
        elif op == "Exists":
            if not present:
                return False
        elif op == "DoesNotExist":
            if present:
                return False
        else:
            return False   # the API server rejects other operators; select nothing
    return True


# -- requests ----------------------------------------------------------------------------------------
def _add(into: dict[str, Quantity], res: Mapping[str, Quantity]) -> None:
    for k, v in res.items():
        into[k] = into.get(k, _ZERO) + v


def _max(into: dict[str, Quantity], res: Mapping[str, Quantity]) -> None:
    for k, v in res.items():
        if v > into.get(k, _ZERO):
            into[k] = v


def _container_requests(c: Mapping) -> dict[str, Quantity]:
    """A container's requests; limits stand in for requests it does not state (as the API server defaults)."""
    res = c.get("resources") or {}
    out = {k: _q(v) for k, v in (res.get("limits") or {}).items()}
    out.update({k: _q(v) for k, v in (res.get("requests") or {}).items()})
    return out


def _resize_infeasible(pod: Mapping) -> bool:
    return any(c.get("type") == "PodResizePending" and c.get("status") == "True" and c.get("reason") == "Infeasible"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _with_status(pod: Mapping, c: Mapping, statuses: Mapping[str, Mapping]) -> dict[str, Quantity]:
    """upstream's UseStatusResources (in-place resize): a running container counts the larger of what its
    status reports and what the kubelet allocated, and its spec too unless the resize is infeasible."""
    cs = statuses.get(c.get("name", ""))
    if cs is None:
        return _container_requests(c)
    out: dict[str, Quantity] = {} if _resize_infeasible(pod) else _container_requests(c)
    _max(out, {k: _q(v) for k, v in (((cs.get("resources") or {}).get("requests")) or {}).items()})
    _max(out, {k: _q(v) for k, v in (cs.get("allocatedResources") or {}).items()})
    return out


def pod_requests(pod: Mapping) -> dict[str, Quantity]:
    """Effective requests as kube-scheduler computes them (component-helpers resource.PodRequests with
    UseStatusResources): the containers' sum; each init container's requests plus the restartable (sidecar)
    init containers started before it, maxed in; every sidecar added to the sum; pod-level requests
    (spec.resources) for the resources they state; then the overhead."""
    spec = _spec(pod)
    status = pod.get("status") or {}
    statuses = {cs.get("name", ""): cs for cs in status.get("containerStatuses") or []}
    init_statuses = {cs.get("name", ""): cs for cs in status.get("initContainerStatuses") or []}
    total: dict[str, Quantity] = {}
    for c in spec.get("containers") or []:
        _add(total, _with_status(pod, c, statuses))
    sidecars: dict[str, Quantity] = {}
    init_max: dict[str, Quantity] = {}
    for c in spec.get("initContainers") or []:
        if c.get("restartPolicy") == "Always":
            reqs = _with_status(pod, c, init_statuses)
            _add(total, reqs)
            _add(sidecars, reqs)
            _max(init_max, sidecars)
        else:
            step = _container_requests(c)
            _add(step, sidecars)
            _max(init_max, step)
    _max(total, init_max)
    pod_level = ((spec.get("resources") or {}).get("requests") or {})
    for k, v in pod_level.items():
        if k in ("cpu", "memory", "hugepages-2Mi", "hugepages-1Gi"):
            total[k] = _q(v)
    _add(total, {k: _q(v) for k, v in (spec.get("overhead") or {}).items()})
    return total


# -- per-node filters ----------------------------------------------------------------------------------
def node_name(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    want = _spec(pod).get("nodeName")
    return "" if not want or want == node.name else f"pod asks for node {want}"


def unschedulable(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    if not (node.obj.get("spec") or {}).get("unschedulable"):
        return ""
    taint = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    if any(tolerates(t, taint) for t in _spec(pod).get("tolerations") or []):
        return ""
    return "node is unschedulable (cordoned)"


def node_selector(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    for k, v in (_spec(pod).get("nodeSelector") or {}).items():
        if node.labels.get(k) != v:
            return f"node label {k}={v} missing (pod nodeSelector)"
    return ""




def _required_node_affinity(pod: Mapping) -> Mapping | None:
    return (((_spec(pod).get("affinity") or {}).get("nodeAffinity") or {})
            .get("requiredDuringSchedulingIgnoredDuringExecution"))


def _affinity_matches(pod: Mapping, node: NodeInfo) -> bool:
    """nodeaffinity.GetRequiredNodeAffinity(pod).Match(node): nodeSelector AND required node affinity
    (an affinity with no terms matches nothing)."""
    for k, v in (_spec(pod).get("nodeSelector") or {}).items():
        if node.labels.get(k) != v:
            return False
    required = _required_node_affinity(pod)
    if required is None:
        return True
    return node_matches_lazily(node.as_node(), required)


def node_affinity(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    why = node_selector(pod, node)
    if why:
        return why
    required = _required_node_affinity(pod)
    if required is None:
        return ""
    return "" if node_matches_lazily(node.as_node(), required) else "node does not match the pod's required node affinity"


def tolerates(toleration: Mapping, taint: Mapping) -> bool:
    """core/v1 Toleration.ToleratesTaint, including the numeric Gt/Lt operators (TaintTolerationComparison-
    Operators): Gt tolerates a taint whose value is greater than the toleration's, Lt one that is smaller."""
    if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
        return False
    op = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return op == "Exists"
    if toleration.get("key") != taint.get("key"):
        return False
    if op == "Exists":
        return True
    if op == "Equal":
        return (toleration.get("value") or "") == (taint.get("value") or "")
    if op in ("Gt", "Lt"):
        try:
            tv, want = int(str(taint.get("value") or "")), int(str(toleration.get("value") or ""))
        except ValueError:
            return False
        return tv > want if op == "Gt" else tv < want
    return False


def untolerated_taint(pod: Mapping, node_taints: Iterable[Mapping]) -> Mapping | None:
    tols = _spec(pod).get("tolerations") or []
    for t in node_taints:
        if t.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(tolerates(x, t) for x in tols):
            return t
    return None


def taints(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    t = untolerated_taint(pod, node.taints)
    if t is None:
        return ""
    value = f"={t['value']}" if t.get("value") else ""
    return f"untolerated taint {t.get('key')}{value}:{t.get('effect')}"


def _live(pods: Iterable[Mapping]) -> list[Mapping]:
    return [p for p in pods if ((p.get("status") or {}).get("phase")) not in TERMINAL]


def resources(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    alloc = (node.obj.get("status") or {}).get("allocatable") or {}
    bound = _live(node.pods)
    allowed = _q(alloc.get("pods", 0)).as_int()
    if len(bound) + 1 > allowed:
        return f"too many pods ({len(bound)} of {alloc.get('pods', 0)} already)"
    want = pod_requests(pod)
    if not any(v.sign() > 0 for v in want.values()):
        return ""
    used: dict[str, Quantity] = {}
    for p in bound:
        _add(used, pod_requests(p))
    for k, v in sorted(want.items()):
        if v.sign() <= 0 or k == "pods":
            continue
        free = _q(alloc.get(k, 0)) - used.get(k, _ZERO)
        if v > free:
            if k not in alloc:
                return f"insufficient {k} (requested {v}, the node offers none)"
            return f"insufficient {k} (requested {v}, free {free})"
    return ""


def _host_ports(pod: Mapping) -> set[tuple[str, str, int]]:
    """Host ports of the containers and the restartable init containers (sidecars)."""
    out = set()
    spec = _spec(pod)
    sidecars = [c for c in spec.get("initContainers") or [] if c.get("restartPolicy") == "Always"]
    for c in (spec.get("containers") or []) + sidecars:
        for p in c.get("ports") or []:
            port = int(p.get("hostPort") or 0)
            if port > 0:
                out.add((p.get("hostIP") or "0.0.0.0", p.get("protocol") or "TCP", port))
    return out


def host_ports(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    want = _host_ports(pod)
    if not want:
        return ""
    for p in _live(node.pods):
        for ip, proto, port in _host_ports(p):
            for wip, wproto, wport in want:
                if proto == wproto and port == wport and (ip == wip or "0.0.0.0" in (ip, wip)):
                    return f"host port {port}/{proto} is in use by pod {_ref(p)}"
    return ""


# -- inter-pod affinity ------------------------------------------------------------------------------
def _term_namespace_matches(term: Mapping, owner_ns: str, ns: str, topo: Topology | None, rule: str) -> bool:
    """Does ``term`` (of a pod in ``owner_ns``) select pods of namespace ``ns``? upstream's AffinityTerm:
    the listed namespaces, those its namespaceSelector selects; neither given: the owner's namespace."""
    namespaces = term.get("namespaces") or []
    nsel = term.get("namespaceSelector")
    if not namespaces and nsel is None:
        return ns == owner_ns
    if ns in namespaces:
        return True
    if nsel is None:
        return False
    if not (nsel.get("matchLabels") or nsel.get("matchExpressions")):
        return True                        # {} selects every namespace
    labels = None if topo is None or topo.namespaces is None else topo.namespaces.get(ns)
    if labels is None:
        if topo is not None and topo.namespaces is not None:
            return False                   # the namespace is gone: no pods of it count
        raise CannotJudge(f"cannot judge the {rule} term with namespaceSelector (topologyKey "
                          f"{term.get('topologyKey', '')}): the labels of namespace {ns} are unknown")
    return selector_matches(nsel, labels)


def _term_matches(term: Mapping, owner_ns: str, pod: Mapping, topo: Topology | None, rule: str) -> bool:
    return (_term_namespace_matches(term, owner_ns, _ns(pod), topo, rule)
            and selector_matches(term.get("labelSelector"), _labels(pod)))


def _required(pod: Mapping, kind: str) -> list[Mapping]:
    return list((((_spec(pod).get("affinity") or {}).get(kind) or {})
                 .get("requiredDuringSchedulingIgnoredDuringExecution")) or [])


def inter_pod_affinity(pod: Mapping, node: NodeInfo, topo: Topology | None) -> str:
    try:
        return _inter_pod_affinity(pod, node, topo or Topology([node]))
    except CannotJudge as e:
        return str(e)


def _selector_valid(selector: Mapping | None) -> str:
    """metav1.LabelSelectorAsSelector's checks on values: "" when valid, else what is wrong."""
    for e in (selector or {}).get("matchExpressions") or []:
        op, values = e.get("operator"), list(e.get("values") or [])
        if op in ("In", "NotIn"):
            bad = [v for v in values if not is_label_value(v)]
            if not values or bad:
                return f"{e.get('key')} {op} {bad or values}: values must be valid label values"
        elif op in ("Exists", "DoesNotExist"):
            if values:
                return f"{e.get('key')} {op} takes no values"
        else:
            return f"unknown label selector operator {op!r}"
    for k, v in ((selector or {}).get("matchLabels") or {}).items():
        if not is_label_value(v):
            return f"matchLabels {k}={v!r}: not a valid label value"
    return ""


@dataclass
class _AffinityState:
    """upstream's InterPodAffinity preFilterState, for one incoming pod."""

    invalid: str = ""
    #: (topology key, value) -> an existing pod whose required anti-affinity the incoming pod violates there
    existing_anti: dict[tuple[str, str], str] = field(default_factory=dict)
    #: (topology key, value) -> existing pods matching all the incoming pod's affinity terms there
    affinity: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (topology key, value) -> existing pods matching one of the incoming pod's anti-affinity terms there
    anti: dict[tuple[str, str], int] = field(default_factory=dict)


def _affinity_state(pod: Mapping, topo: Topology) -> _AffinityState:
    st = _AffinityState()
    ns = _ns(pod)
    for kind in ("podAffinity", "podAntiAffinity"):
        for term in _required(pod, kind):
            bad = _selector_valid(term.get("labelSelector")) or _selector_valid(term.get("namespaceSelector"))
            if bad:
                st.invalid = f"the pod's required {kind} term (topologyKey {term.get('topologyKey', '')}) is invalid: {bad}"
                return st
    affinity, anti = _required(pod, "podAffinity"), _required(pod, "podAntiAffinity")
    for n in topo.nodes:
        for p in n.pods:
            for term in _required(p, "podAntiAffinity"):
                key = term.get("topologyKey", "")
                if key in n.labels and (key, n.labels[key]) not in st.existing_anti and \
                        _term_matches(term, _ns(p), pod, topo, "existing pod's anti-affinity"):
                    st.existing_anti[(key, n.labels[key])] = f"pod {_ref(p)} has anti-affinity against it ({key})"
            if affinity and all(_term_matches(t, ns, p, topo, "pod affinity") for t in affinity):
                for t in affinity:
                    key = t.get("topologyKey", "")
                    if key in n.labels:
                        st.affinity[(key, n.labels[key])] = st.affinity.get((key, n.labels[key]), 0) + 1
            for t in anti:
                key = t.get("topologyKey", "")
                if key in n.labels and _term_matches(t, ns, p, topo, "pod anti-affinity"):
                    st.anti[(key, n.labels[key])] = st.anti.get((key, n.labels[key]), 0) + 1
    return st


def _inter_pod_affinity(pod: Mapping, node: NodeInfo, topo: Topology) -> str:
    st = topo.memo("InterPodAffinity", pod, lambda: _affinity_state(pod, topo))
    if isinstance(st, CannotJudge):
        raise st
    assert isinstance(st, _AffinityState)
    if st.invalid:
        return st.invalid
    # existing pods' required anti-affinity against the incoming pod (symmetry)
    for (key, value), why in st.existing_anti.items():
        if node.labels.get(key) == value:
            return why
    # the incoming pod's required affinity: in the node's domain of every term, a pod that matches ALL the
    # terms (upstream counts a pod for the terms' topology pairs only when it matches every term)
    terms = _required(pod, "podAffinity")
    if terms:
        missing = [t.get("topologyKey", "") for t in terms if t.get("topologyKey", "") not in node.labels]
        if missing:
            return f"required pod affinity: node lacks topology label {missing[0]}"
        if any(st.affinity.get((t.get("topologyKey", ""), node.labels[t.get("topologyKey", "")]), 0) <= 0 for t in terms):
            # the first pod of a group whose affinity selects itself: no pod anywhere matches the terms and
            # the pod matches all of them itself
            first = not st.affinity and all(_term_matches(t, _ns(pod), pod, topo, "pod affinity") for t in terms)
            if not first:
                keys = ", ".join(sorted({t.get("topologyKey", "") for t in terms}))
                return f"required pod affinity ({keys}) not satisfied"
    # the incoming pod's required anti-affinity
    for term in _required(pod, "podAntiAffinity"):
        key = term.get("topologyKey", "")
        if key in node.labels and st.anti.get((key, node.labels[key]), 0) > 0:
            return f"required pod anti-affinity ({key}) not satisfied"
    return ""


# -- topology spread ---------------------------------------------------------------------------------
@dataclass
class _Constraint:
    max_skew: int
    key: str
    selector: Mapping | None
    min_domains: int
    honor_affinity: bool
    honor_taints: bool


def _merge_match_label_keys(c: Mapping, pod: Mapping) -> Mapping | None:
    selector = c.get("labelSelector")
    keys = c.get("matchLabelKeys") or []
    extra = {k: _labels(pod)[k] for k in keys if k in _labels(pod)}
    if not extra:
        return selector
    if selector is None:
        return {"matchLabels": extra}   # upstream: merged into Nothing, whose requirements are none
    merged = dict(selector)
    merged["matchExpressions"] = list(selector.get("matchExpressions") or []) + [
        {"key": k, "operator": "In", "values": [v]} for k, v in extra.items()]
    return merged


def _constraints(pod: Mapping) -> list[_Constraint]:
    out = []
    for c in _spec(pod).get("topologySpreadConstraints") or []:
        if c.get("whenUnsatisfiable", "DoNotSchedule") != "DoNotSchedule":
            continue
        out.append(_Constraint(int(c.get("maxSkew", 1)), c.get("topologyKey", ""), _merge_match_label_keys(c, pod),
                               int(c.get("minDomains") or 1), (c.get("nodeAffinityPolicy") or "Honor") == "Honor",
                               (c.get("nodeTaintsPolicy") or "Ignore") == "Honor"))
    return out


def _counts(pod: Mapping, constraints: list[_Constraint], topo: Topology) -> list[dict[str, int]]:
    """Matching pods per domain of each constraint, over the nodes that count (upstream's PreFilter)."""
    ns = _ns(pod)
    counts: list[dict[str, int]] = [{} for _ in constraints]
    for n in topo.nodes:
        if any(c.key not in n.labels for c in constraints):
            continue
        for i, c in enumerate(constraints):
            if c.honor_affinity and not _affinity_matches(pod, n):
                continue
            if c.honor_taints and untolerated_taint(pod, n.taints) is not None:
                continue
            value = n.labels[c.key]
            matching = sum(1 for p in n.pods if _ns(p) == ns and not _md(p).get("deletionTimestamp")
                           and selector_matches(c.selector, _labels(p)))
            counts[i][value] = counts[i].get(value, 0) + matching
    return counts


def topology_spread(pod: Mapping, node: NodeInfo, topo: Topology | None) -> str:
    constraints = _constraints(pod)
    if not constraints:
        return ""
    topo = topo or Topology([node])
    counts = topo.memo("PodTopologySpread", pod, lambda: _counts(pod, constraints, topo))
    assert isinstance(counts, list)
    for i, c in enumerate(constraints):
        if c.key not in node.labels:
            return f"node lacks topology label {c.key}"
        domains = counts[i]
        minimum = min(domains.values()) if domains else 0
        if len(domains) < c.min_domains:
            minimum = 0
        self_match = 1 if selector_matches(c.selector, _labels(pod)) else 0
        skew = domains.get(node.labels[c.key], 0) + self_match - minimum
        if skew > c.max_skew:
            return f"topology spread on {c.key} would have skew {skew} > maxSkew {c.max_skew}"
    return ""


Filter = Callable[[Mapping, NodeInfo, "Topology | None"], str]

#: kube-scheduler's Filter plugins by their upstream names, in the default profile's order
PLUGINS: dict[str, Filter] = {
    "NodeUnschedulable": unschedulable,
    "NodeName": node_name,
    "TaintToleration": taints,
    "NodeAffinity": node_affinity,
    "NodePorts": host_ports,
    "NodeResourcesFit": resources,
    "PodTopologySpread": topology_spread,
    "InterPodAffinity": inter_pod_affinity,
}


CLUSTER_WIDE = ("PodTopologySpread", "InterPodAffinity")


def fit(pod: Mapping, node: NodeInfo, topo: Topology | None = None) -> str:
    """"" when the pod fits the node, else the first reason it does not. Without ``topo`` (no view of
    the other nodes) the spread and inter-pod affinity filters are not run."""
    for name, f in PLUGINS.items():
        if topo is None and name in CLUSTER_WIDE:
            continue
        why = f(pod, node, topo)
        if why:
            return why
    return ""
