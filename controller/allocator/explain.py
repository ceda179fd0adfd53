"""``partita explain``: why a claim cannot be allocated, and the one change that would make it fit.

Runs the allocator itself (the same selectors, CEL, counters, capacity and constraints the controller
uses, :class:`Allocator`), first to see whether the claim fits anywhere, then device by device to count
what excluded each published device for each request, in this order: the class selectors, the request's
own selectors, device taints it does not tolerate, devices other claims hold, counters other claims used
up (a GPU in another mode), shared capacity left, and finally whether any single node has enough of what
is left (``node``) or, when one has, the claim's constraints. Then it tries single changes — a lower count,
a toleration, dropping one selector, a smaller capacity request, freeing one other claim, dropping one
constraint — and reports the first one with which the allocator finds a solution.

Inputs are files (claim or template, slices, classes, other allocated claims) or the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.api.quantity import Quantity

from .allocator import Allocator, copy_claim_with_tolerations
from .pools import SliceIndex, available_counters
from .search import claim_ref, taint_prevents
from .types import AllocatedState, AllocationError, DeviceID, Features, Node

STAGES = ("class selector", "request selector", "taint", "allocated", "counters", "capacity")
EXAMPLES = 3


class ExplainInputError(ValueError):
    """Input explain cannot use; the message names the file or object and the fix."""


@dataclass
class Stage:
    reason: str
    excluded: int = 0
    examples: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class RequestReport:
    request: str
    device_class: str
    needs: str
    published: int = 0
    stages: list[Stage] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)    # node -> devices left
    verdict: str = ""


@dataclass
class Explanation:
    claim: str
    fits: bool
    node: str | None = None
    devices: list[str] = field(default_factory=list)
    requests: list[RequestReport] = field(default_factory=list)
    fix: str | None = None
    error: str | None = None


# -- the analysis ---------------------------------------------------------------------------------
class Explainer:
    def __init__(self, slices: Sequence[Mapping], classes: Mapping[str, Mapping], allocated_claims: Sequence[Mapping] = (),
                 *, managed_toleration: bool = True, features: Features = Features(),
                 nodes: Sequence[Node] | None = None):
        self.slices = [dict(s) for s in slices]
        self.index = SliceIndex.from_slices(self.slices)
        self.classes = classes
        self.allocated_claims = list(allocated_claims)
        self.managed_toleration = managed_toleration
        self.features = features
        self.nodes = list(nodes) if nodes is not None else [Node(n) for n in sorted(self.index.node_names())]

    def _state(self, without: str | None = None) -> AllocatedState:
        state = AllocatedState()
        for c in self.allocated_claims:
            if claim_ref(c) == without:
                continue
            alloc = (c.get("status") or {}).get("allocation")
            if alloc:
                state.add_allocation(alloc)
        return state

    def _input(self, claim: Mapping) -> dict:
        return copy_claim_with_tolerations(claim, [C.managed_toleration()]) if self.managed_toleration else dict(claim)

    def _try(self, claim: Mapping, state: AllocatedState | None = None):  # noqa: ANN202
        allocator = Allocator(self.features, "first-fit")
        return allocator.allocate_on_nodes(self.nodes, [self._input(claim)], self.index, self.classes,
                                           state if state is not None else self._state())

    def explain(self, claim: Mapping) -> Explanation:
        ref = claim_ref(claim)
        out = Explanation(claim=ref, fits=False)
        if not self.nodes:
            out.error = "no ResourceSlices name a node; pass the slices of the nodes the claim could use"
            return out
        choice = self._try(claim)          # AllocationError: bad input, the caller reports it
        if choice.node is not None:
            out.fits, out.node = True, choice.node.name
            out.devices = [f"{r['pool']}/{r['device']}" for r in choice.results[0]["devices"]["results"]]
            return out
        out.requests = self._funnel(claim)
        out.fix = self._fix(claim, out.requests)
        return out

    def _funnel(self, claim: Mapping) -> list[RequestReport]:
        allocator = Allocator(self.features, "first-fit")
        state = self._state()
        claims = [self._input(claim)]
        reports: dict[str, RequestReport] = {}
        for node in self.nodes:
            run = allocator._run(node, claims, self.index, self.classes, state)   # noqa: SLF001 - same package
            pools = [p for p in run.pools if not (p.incomplete or p.invalid)]
            for key, rd in sorted(run.req.items()):
                cls = (rd.cls or {}).get("metadata", {}).get("name", "?")
                rep = reports.get(rd.full_name)
                if rep is None:
                    need = str(rd.num_devices) if rd.mode == "ExactCount" else "all"
                    rep = reports[rd.full_name] = RequestReport(rd.full_name, cls, need,
                                                                stages=[Stage(s) for s in STAGES])
                stages = {s.reason: s for s in rep.stages}
                left = 0
                for pool in pools:
                    passing = {id(d): failure for d, failure in run.class_list(pool, rd)}
                    avail = available_counters(pool, state)
                    for dev in pool.devices():
                        rep.published += 1
                        reason = self._exclusion(run, key, rd, dev, passing, avail, state)
                        if reason is None:
                            left += 1
                            continue
                        st = stages[reason]
                        st.excluded += 1
                        if len(st.examples) < EXAMPLES:
                            st.examples.append(f"{node.name}/{dev.name}")
                rep.candidates[node.name] = left
        for rep in reports.values():
            rep.stages = [s for s in rep.stages if s.excluded]
            best = max(rep.candidates.items(), key=lambda kv: kv[1], default=("-", 0))
            if rep.needs == "all":
                rep.verdict = "asks for all matching devices of a node"
            elif best[1] < int(rep.needs):
                rep.verdict = (f"needs {rep.needs} on one node; the most any node has left is {best[1]}"
                               + (f" ({best[0]})" if best[1] else ""))
            else:
                rep.verdict = (f"node {best[0]} has {best[1]} candidate(s), enough alone; the claim's constraints "
                               "or its other requests rule the combination out")
        return list(reports.values())

    @staticmethod
    def _exclusion(run, key, rd, dev, passing: dict, avail: dict, state: AllocatedState) -> str | None:  # noqa: ANN001
        failure = passing.get(id(dev), False)
        if failure is False:
            return "class selector"
        if failure is not None:
            run._raise_selector_error(rd, dev, failure, from_class=True)   # noqa: SLF001
        if not run.request_ok(key, rd, dev):
            return "request selector"
        if run.f.device_taints and taint_prevents(dev, rd.tolerations):
            return "taint"
        multi = run.f.consumable_capacity and dev.allow_multiple
        if not rd.admin and dev.id in state.devices:
            return "allocated"
        if dev.consumes and not (multi and dev.id in state.capacity):
            for cs, counters in dev.consumes:
                have = avail.get(cs, {})
                if any(have.get(c, 0) < v for c, v in counters):
                    return "counters"
        if run.f.consumable_capacity and not run._capacity_fits(rd, dev):   # noqa: SLF001
            return "capacity"
        return None

    # -- a single change that makes it fit ---------------------------------------------------------
    def _fix(self, claim: Mapping, reports: list[RequestReport]) -> str | None:
        for description, changed, state in self._changes(claim, reports):
            try:
                if self._try(changed, state).node is not None:
                    return description
            except AllocationError:
                continue
        return None

    def _changes(self, claim: Mapping, reports: list[RequestReport]):  # noqa: ANN202 - generator
        requests = ((claim.get("spec") or {}).get("devices") or {}).get("requests") or []
        by_name = {r.request: r for r in reports}
        for i, req in enumerate(requests):
            exactly = req.get("exactly")
            where = f"spec.devices.requests[{i}].exactly"
            rep = by_name.get(req.get("name", ""))
            if exactly is None or rep is None:
                continue
            count = exactly.get("count", 1)
            best = max(rep.candidates.values(), default=0)
            if exactly.get("allocationMode", "ExactCount") == "ExactCount" and isinstance(count, int) and 0 < best < count:
                yield (f"lower {where}.count from {count} to {best}",
                       _edit(claim, i, lambda e, b=best: e.__setitem__("count", b)), None)
            for taint in self._blocking_taints(rep):
                tol = {"key": taint["key"], "operator": "Exists", "effect": taint["effect"]}
                yield (f"add the toleration {json.dumps(tol)} to {where}.tolerations (devices carry the taint "
                       f"{taint['key']}={taint.get('value', '')}:{taint['effect']})",
                       _edit(claim, i, lambda e, t=tol: e.setdefault("tolerations", []).append(t)), None)
            for j, sel in enumerate(exactly.get("selectors") or []):
                expr = (sel.get("cel") or {}).get("expression", "")
                yield (f"remove {where}.selectors[{j}] ({expr})",
                       _edit(claim, i, lambda e, j=j: e["selectors"].pop(j)), None)
            for name, amount in ((exactly.get("capacity") or {}).get("requests") or {}).items():
                free = self._largest_free(name)
                if free is None or not free < Quantity.parse(amount):
                    continue
                # the device's request policy may round a request up: offer whole GiB, then MiB, then exact
                for unit, suffix in ((1 << 30, "Gi"), (1 << 20, "Mi")):
                    whole = free.as_int() // unit
                    if whole > 0:
                        q = f"{whole}{suffix}"
                        yield (f"ask for {q} instead of {amount} in {where}.capacity.requests.{name} (the most any "
                               "shared device has left)",
                               _edit(claim, i, lambda e, n=name, q=q: e["capacity"]["requests"].__setitem__(n, q)), None)
        for holder in self._holders(claim):
            yield (f"free the devices held by claim {holder} (delete it, or the pods using it)", claim,
                   self._state(without=holder))
        for k, _ in enumerate(((claim.get("spec") or {}).get("devices") or {}).get("constraints") or []):
            changed = copy.deepcopy(dict(claim))
            changed["spec"]["devices"]["constraints"].pop(k)
            yield f"remove spec.devices.constraints[{k}]", changed, None

    def _blocking_taints(self, rep: RequestReport) -> list[dict]:
        seen, out = set(), []
        stage = next((s for s in rep.stages if s.reason == "taint"), None)
        for example in stage.examples if stage else []:
            node, _, name = example.partition("/")
            for s in self.slices:
                if (s.get("spec") or {}).get("nodeName") != node:
                    continue
                for d in (s.get("spec") or {}).get("devices") or []:
                    if d.get("name") == name:
                        for t in d.get("taints") or []:
                            k = (t.get("key"), t.get("effect"))
                            if k not in seen and t.get("key") != C.MANAGED_TAINT_KEY:
                                seen.add(k)
                                out.append(t)
        return out

    def _largest_free(self, name: str) -> Quantity | None:
        state = self._state()
        best = None
        for s in self.slices:
            for d in (s.get("spec") or {}).get("devices") or []:
                if not d.get("allowMultipleAllocations"):
                    continue
                total = ((d.get("capacity") or {}).get(name) or {}).get("value")
                if total is None:
                    continue
                did = DeviceID(s["spec"]["driver"], s["spec"]["pool"]["name"], d["name"])
                used = state.capacity.get(did, {}).get(name, Quantity.from_int(0))
                free = Quantity.parse(total) - used
                if best is None or best < free:
                    best = free
        return best if best is not None and best.sign() > 0 else None

    def _holders(self, claim: Mapping, limit: int = 20) -> list[str]:
        """Other allocated claims, each tried as "free it" (the allocator decides which would help)."""
        ref = claim_ref(claim)
        out = []
        for c in self.allocated_claims:
            if claim_ref(c) != ref and (c.get("status") or {}).get("allocation"):
                out.append(claim_ref(c))
            if len(out) >= limit:
                break
        return out


def _edit(claim: Mapping, index: int, change) -> dict:  # noqa: ANN001
    c = copy.deepcopy(dict(claim))
    change(c["spec"]["devices"]["requests"][index]["exactly"])
    return c


# -- rendering ------------------------------------------------------------------------------------
def render(e: Explanation) -> str:
    if e.error:
        return f"claim {e.claim}: {e.error}"
    if e.fits:
        return f"claim {e.claim} fits: node {e.node}, devices {', '.join(e.devices)}"
    lines = [f"claim {e.claim} cannot be allocated:"]
    for r in e.requests:
        lines.append(f"  request {r.request} (class {r.device_class}, needs {r.needs}): "
                     f"{r.published} device(s) published")
        for s in r.stages:
            ex = f" e.g. {', '.join(s.examples)}" if s.examples else ""
            lines.append(f"    - {s.excluded:>5} excluded by {s.reason}{ex}")
        left = ", ".join(f"{n} {k}" for n, k in sorted(r.candidates.items(), key=lambda kv: -kv[1]) if k) or "none"
        lines.append(f"    = candidates left: {left}")
        lines.append(f"    {r.verdict}")
    lines.append(f"fix: {e.fix}" if e.fix else "fix: no single change makes it fit")
    return "\n".join(lines)


# -- inputs ---------------------------------------------------------------------------------------
def _load_docs(paths: Sequence[Path]) -> list[dict]:
    docs: list[dict] = []
    for p in paths:
        files = sorted(Path(p).glob("*.y*ml")) + sorted(Path(p).glob("*.json")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            try:
                loaded = list(yaml.safe_load_all(f.read_text()))
            except OSError as e:
                raise ExplainInputError(f"cannot read {f}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise ExplainInputError(f"{f} is not valid YAML or JSON: {e}") from None
            for d in loaded:
                if isinstance(d, dict) and d.get("kind", "").endswith("List"):
                    docs.extend(d.get("items") or [])
                elif isinstance(d, dict):
                    docs.append(d)
    return docs


def claim_from(doc: Mapping, where: str) -> dict:
    kind = doc.get("kind")
    if kind == "ResourceClaimTemplate":
        md = doc.get("metadata") or {}
        return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"name": md.get("name", "template"), "namespace": md.get("namespace", "default")},
                "spec": copy.deepcopy((doc.get("spec") or {}).get("spec") or {})}
    if kind != "ResourceClaim":
        raise ExplainInputError(f"{where}: expected a ResourceClaim or ResourceClaimTemplate, got kind {kind!r}")
    return copy.deepcopy(dict(doc))


async def _from_cluster(kube_api: str | None, claim_name: str | None) -> tuple[dict | None, list, list, list]:
    from driver.api.kube import Kube, KubeError

    kube = await Kube.connect(kube_api)
    try:
        claim = None
        if claim_name:
            ns, _, name = claim_name.rpartition("/")
            claim = await kube.get(f"/apis/resource.k8s.io/v1/namespaces/{ns or 'default'}/resourceclaims/{name}")
        slices = (await kube.list("/apis/resource.k8s.io/v1/resourceslices")).get("items") or []
        classes = (await kube.list("/apis/resource.k8s.io/v1/deviceclasses")).get("items") or []
        claims = (await kube.list("/apis/resource.k8s.io/v1/resourceclaims")).get("items") or []
        return claim, slices, classes, claims
    except KubeError as e:
        raise ExplainInputError(f"reading from the API server: {e}") from None
    finally:
        await kube.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--claim-file", type=Path, help="a ResourceClaim or ResourceClaimTemplate (YAML/JSON)")
    p.add_argument("--claim", metavar="NAMESPACE/NAME", help="a claim in the cluster instead of a file")
    p.add_argument("--slices", type=Path, nargs="+", metavar="PATH",
                   help="ResourceSlice files or directories (e.g. `partita inventory -o yaml` output); "
                        "default: the cluster's")
    p.add_argument("--classes", type=Path, nargs="+", metavar="PATH",
                   help="DeviceClass files (default: the cluster's with --slices absent, else Partita's shipped classes)")
    p.add_argument("--allocated", type=Path, nargs="+", metavar="PATH",
                   help="other allocated ResourceClaims, whose devices, counters and capacity are in use")
    p.add_argument("--allocation-mode", choices=C.ALLOCATION_MODES, default=C.ALLOCATION_MODE_CONTROLLER,
                   help="controller (default): the claim tolerates Partita's managed taint, as the controller "
                        "makes it; scheduler: as kube-scheduler sees it")
    p.add_argument("--kube-api", help="plain-HTTP API server URL; default: in-cluster, then kubeconfig")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    try:
        explanation = _run(args)
    except (ExplainInputError, AllocationError) as e:
        print(f"partita explain: {e}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(asdict(explanation), indent=2))
    else:
        print(render(explanation))
    return 0 if explanation.fits else 1


def _run(args: argparse.Namespace) -> Explanation:
    if bool(args.claim_file) == bool(args.claim):
        raise ExplainInputError("give the claim either as a file (-f FILE) or as NAMESPACE/NAME in the cluster (--claim)")
    cluster: tuple | None = None
    if args.claim or not args.slices:
        cluster = asyncio.run(_from_cluster(args.kube_api, args.claim))
    if args.claim_file:
        docs = _load_docs([args.claim_file])
        if len(docs) != 1:
            raise ExplainInputError(f"{args.claim_file}: expected one ResourceClaim or ResourceClaimTemplate, "
                                    f"found {len(docs)} objects")
        claim = claim_from(docs[0], str(args.claim_file))
    else:
        claim = claim_from(cluster[0], args.claim)
    slices = _load_docs(args.slices) if args.slices else cluster[1]
    slices = [s for s in slices if s.get("kind", "ResourceSlice") == "ResourceSlice"]
    if args.classes:
        classes_list = _load_docs(args.classes)
    elif cluster is not None and not args.slices:
        classes_list = cluster[2]
    else:
        drivers = {(s.get("spec") or {}).get("driver") for s in slices} or {C.DEFAULT_DRIVER_NAME}
        classes_list = [c for d in sorted(x for x in drivers if x) for c in device_classes(d)]
    classes = {c["metadata"]["name"]: c for c in classes_list if c.get("kind") == "DeviceClass"}
    allocated = _load_docs(args.allocated) if args.allocated else (cluster[3] if cluster is not None else [])
    explainer = Explainer(slices, classes, [c for c in allocated if claim_ref(c) != claim_ref(claim)],
                          managed_toleration=args.allocation_mode == C.ALLOCATION_MODE_CONTROLLER)
    return explainer.explain(claim)


__all__ = ["Explainer", "Explanation", "RequestReport", "add_arguments", "render", "run"]
