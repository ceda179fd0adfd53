"""``partita explain``'s command layer: the claim and what it is explained against, read from files or from
the cluster (through :mod:`driver.api.kube`'s paths), DeviceTaintRules merged in, and the
:class:`~controller.allocator.explain.Explanation` printed. The analysis itself is the allocator library's
(:mod:`controller.allocator.explain`, no API calls).

Inputs are files (claim or template, slices, classes, nodes, other allocated claims; one multi-document
``-f`` file may hold them all, with ``--claim NAME`` picking one of several claims) or the cluster
(``--kubeconfig``/``--context``/``-n``, the claim's namespace defaulting to the context's).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from controller.allocator import AllocationError, Node
from controller.allocator.devicetaints import KIND as TAINT_RULE_KIND, TaintRules
from controller.allocator.explain import ExplainInputError, Explainer, Explanation, render
from driver.api import constants as C
from driver.api import objects
from driver.api.deviceclasses import device_classes
from driver.cliopts import add_cluster, add_output

def _load_docs(paths: Sequence[Path], what: str) -> list[dict]:
    docs: list[dict] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted([*p.glob("*.yaml"), *p.glob("*.yml"), *p.glob("*.json")])
            if not files:
                raise ExplainInputError(f"{what}: directory {p} holds no .yaml, .yml or .json file")
        else:
            files = [p]
        for f in files:
            try:
                loaded = list(yaml.safe_load_all(f.read_text()))
            except OSError as e:
                raise ExplainInputError(f"{what}: cannot read {f}: {e.strerror}") from None
            except yaml.YAMLError as e:
                raise ExplainInputError(f"{what}: {f} is not valid YAML or JSON: {e}") from None
            for d in loaded:
                if isinstance(d, dict) and str(d.get("kind", "")).endswith("List"):
                    docs.extend(x for x in d.get("items") or [] if isinstance(x, dict))
                elif isinstance(d, dict):
                    docs.append(d)
                elif d is not None:
                    raise ExplainInputError(f"{what}: {f} holds a {type(d).__name__}, not a Kubernetes object")
    return docs


def claim_from(doc: Mapping, where: str) -> dict:
    kind = doc.get("kind")
    if kind == "ResourceClaimTemplate":
        md = doc.get("metadata") or {}
        claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                 "metadata": {"name": md.get("name", "template"), "namespace": md.get("namespace", "default")},
                 "spec": copy.deepcopy((doc.get("spec") or {}).get("spec") or {})}
    elif kind == "ResourceClaim":
        claim = copy.deepcopy(dict(doc))
    else:
        raise ExplainInputError(f"{where}: expected a ResourceClaim or ResourceClaimTemplate, got kind {kind!r}")
    name = (claim.get("metadata") or {}).get("name")
    requests = ((claim.get("spec") or {}).get("devices") or {}).get("requests")
    if not isinstance(requests, list) or not requests:
        raise ExplainInputError(f"{where}: {kind} {name!r} has no spec.devices.requests; a claim needs at least "
                                "one request")
    for i, r in enumerate(requests):
        if not isinstance(r, dict) or not r.get("name") or ("exactly" not in r and "firstAvailable" not in r):
            raise ExplainInputError(f"{where}: {kind} {name!r}: spec.devices.requests[{i}] needs a name and either "
                                    "exactly or firstAvailable")
    return claim


def _with_taint_rules(slices: list[dict], rules: Sequence[Mapping], classes: Mapping[str, Mapping],
                      where: str) -> list[dict]:
    """The slices with the DeviceTaintRules' taints merged in (controller.allocator.devicetaints)."""
    wrong = sorted({str(r.get("kind")) for r in rules if r.get("kind", TAINT_RULE_KIND) != TAINT_RULE_KIND})
    if wrong:
        raise ExplainInputError(f"{where}: expected DeviceTaintRule objects, found {', '.join(wrong)}")
    merged = TaintRules(rules, classes)
    if merged.problems:
        raise ExplainInputError(f"{where}: " + "; ".join(merged.problems[n] for n in sorted(merged.problems)))
    return [dict(s) for s in merged.patch_all(slices)]


def _nodes(docs: Sequence[Mapping]) -> list[Node]:
    return [Node(d["metadata"]["name"], dict((d["metadata"].get("labels") or {})))
            for d in docs if d.get("kind") == "Node" and (d.get("metadata") or {}).get("name")]


async def _from_cluster(args: argparse.Namespace, claim_name: str | None) -> dict:
    from driver.api.kube import (CLAIMS, DEVICE_CLASSES, NODES, SLICES, InvalidName, KubeError, check_name,
                                 check_namespace, claim_path)
    from driver.cliopts import connect_or, unreachable, where as where_of

    if claim_name:      # a hostile or malformed name is refused before anything is sent, or even connected
        given_ns, _, given_name = claim_name.rpartition("/")
        try:
            check_name(given_name, "ResourceClaim name")
            if given_ns:
                check_namespace(given_ns, "ResourceClaim namespace")
        except InvalidName as e:
            raise ExplainInputError(f"--claim {claim_name}: {e}; give it as NAME (with -n NAMESPACE) or "
                                    "NAMESPACE/NAME") from None
    where = where_of(args)
    kube = await connect_or(args, ExplainInputError, _FILES_INSTEAD)
    try:
        out: dict = {}
        if claim_name:
            ns, _, name = claim_name.rpartition("/")
            ns = ns or getattr(args, "namespace", None) or kube.namespace
            try:
                out["claim"] = await kube.get(claim_path(ns, name))
            except InvalidName as e:
                raise ExplainInputError(f"--claim {claim_name}: {e}; give it as NAME (with -n NAMESPACE) or "
                                        "NAMESPACE/NAME") from None
            except KubeError as e:
                if e.not_found:
                    raise ExplainInputError(f"--claim {claim_name}: ResourceClaim {name} not found in namespace "
                                            f"{ns}; give it as NAME with -n NAMESPACE, or as NAMESPACE/NAME") from None
                raise
        for key, kind, path in (("slices", "ResourceSlice", SLICES), ("classes", "DeviceClass", DEVICE_CLASSES),
                                ("claims", "ResourceClaim", CLAIMS), ("nodes", "Node", NODES)):
            try:
                items = (await kube.list(path)).get("items") or []
            except KubeError:
                if key != "nodes":
                    raise
                items = []          # not allowed to list nodes: the nodes the slices name still count
            out[key] = [{"kind": kind, **i} for i in items]
        out["taintrules"] = await _cluster_taint_rules(kube)
        return out
    except KubeError as e:
        raise ExplainInputError(f"reading from the API server ({where}): {e}") from None
    except (OSError, asyncio.TimeoutError) as e:
        raise ExplainInputError(unreachable(args, e, _FILES_INSTEAD)) from None
    except Exception as e:  # noqa: BLE001 - a client library error: a clear message, not a traceback
        if isinstance(e, ExplainInputError):
            raise
        raise ExplainInputError(f"reading from the API server ({where}): {type(e).__name__}: {e}") from None
    finally:
        await kube.close()


async def _cluster_taint_rules(kube) -> list[dict]:  # noqa: ANN001
    """The cluster's DeviceTaintRules, in the version discovery says it serves (none when it serves none)."""
    from controller.operator.taintrules import discover_version
    from driver.api.kube import KubeError, device_taint_rules_path

    version = await discover_version(kube)
    if version is None:
        return []
    try:
        items = (await kube.list(device_taint_rules_path(version))).get("items") or []
    except KubeError:
        return []     # not allowed to list them: explain as the slices are published
    return [{"kind": TAINT_RULE_KIND, **i} for i in items]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--claim-file", type=Path,
                   help="a ResourceClaim or ResourceClaimTemplate (YAML/JSON); a multi-document file may also hold "
                        "the ResourceSlices, DeviceClasses, allocated claims, Nodes and DeviceTaintRules to explain "
                        "against, and several claims (pick one with --claim NAME)")
    p.add_argument("--claim", metavar="[NAMESPACE/]NAME",
                   help="the claim in the cluster (namespace: -n, else the kubeconfig context's), or, with -f, the "
                        "claim of that name in the file")
    for flag, help_ in (
            ("--slices", "ResourceSlice files or directories (e.g. `partita inventory --fake H100-SXM5-80GB:8 -o "
                         "yaml` output); default: the cluster's"),
            ("--classes", "DeviceClass files (default: the cluster's with --slices absent, else Partita's shipped "
                          "classes)"),
            ("--allocated", "other allocated ResourceClaims, whose devices, counters and capacity are in use "
                            "(default: the cluster's with --slices absent)"),
            ("--nodes", "Node objects, for slices that select nodes by label (default: the cluster's with --slices "
                        "absent; the nodes the slices name are always included)"),
            ("--taint-rules", "DeviceTaintRule files, merged into the devices' taints as kube-scheduler does "
                              "(default: the cluster's with --slices absent)")):
        p.add_argument(flag, type=Path, nargs="+", metavar="PATH", help=help_)
    p.add_argument("--allocation-mode", choices=C.ALLOCATION_MODES, default=C.ALLOCATION_MODE_CONTROLLER,
                   help="controller (default): the claim tolerates Partita's managed taint, as the controller "
                        "makes it; scheduler: as kube-scheduler sees it")
    add_cluster(p)
    add_output(p, help_="table (default: the explanation), wide (every node's devices left, each device chosen), "
                        "yaml or json")


def run(args: argparse.Namespace) -> int:
    try:
        explanation = _run(args)
    except (ExplainInputError, AllocationError) as e:
        print(f"partita explain: {e}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(asdict(explanation), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(asdict(explanation), sort_keys=False), end="")
    else:
        print(render(explanation, wide=args.output == "wide"))
    return 0 if explanation.fits else 1


#: kinds a multi-document ``-f`` file may hold besides the claim, and the flag each stands in for
#: what a reader of the cluster may give instead when it cannot reach one
_FILES_INSTEAD = "give the slices as files (--slices)"
_FILE_KINDS = {"ResourceSlice": "--slices", "DeviceClass": "--classes", "Node": "--nodes",
               TAINT_RULE_KIND: "--taint-rules"}
_CLAIM_KINDS = ("ResourceClaim", "ResourceClaimTemplate")


def _split_claim_file(path: Path, pick: str | None) -> tuple[dict, dict[str, list[dict]], list[dict]]:
    """The claim of a ``-f`` file (the only one, or the one ``pick`` names), the other objects by kind, and
    the file's other claims (those allocated count as allocated)."""
    docs = _load_docs([path], "claim")
    claims = [d for d in docs if d.get("kind") in _CLAIM_KINDS]
    others: dict[str, list[dict]] = {k: [d for d in docs if d.get("kind") == k] for k in _FILE_KINDS}
    unknown = sorted({str(d.get("kind")) for d in docs if d.get("kind") not in (*_CLAIM_KINDS, *_FILE_KINDS)})
    if unknown and not claims:
        raise ExplainInputError(f"{path}: expected a ResourceClaim or ResourceClaimTemplate, got kind "
                                f"{unknown[0]!r}")
    if unknown:
        raise ExplainInputError(f"{path}: holds {', '.join(unknown)}; a claim file may hold ResourceClaims, "
                                f"ResourceClaimTemplates, {', '.join(_FILE_KINDS)} objects only")
    if not claims:
        raise ExplainInputError(f"{path}: holds no ResourceClaim or ResourceClaimTemplate")

    def ref(d: Mapping) -> str:
        md = d.get("metadata") or {}
        return f"{md.get('namespace') or 'default'}/{md.get('name', '')}"

    if pick:
        ns, _, name = pick.rpartition("/")
        chosen = [d for d in claims if (d.get("metadata") or {}).get("name") == name
                  and (not ns or ref(d).split("/")[0] == ns)]
        if len(chosen) != 1:
            held = ", ".join(ref(d) for d in claims)
            what = "several claims match" if chosen else "no claim matches"
            raise ExplainInputError(f"--claim {pick}: {what} in {path} (it holds {held}); give it as NAME or "
                                    "NAMESPACE/NAME")
    elif len(claims) > 1:
        raise ExplainInputError(f"{path}: holds {len(claims)} claims ({', '.join(ref(d) for d in claims)}); pick "
                                "one with --claim NAME")
    else:
        chosen = claims
    rest = [d for d in claims if d is not chosen[0] and d.get("kind") == "ResourceClaim"]
    return claim_from(chosen[0], str(path)), others, rest


def _run(args: argparse.Namespace) -> Explanation:
    if not args.claim_file and not args.claim:
        raise ExplainInputError("give the claim either as a file (-f FILE) or as [NAMESPACE/]NAME in the cluster "
                                "(--claim)")
    in_file: dict[str, list[dict]] = {}
    file_claims: list[dict] = []
    if args.claim_file:
        claim, in_file, file_claims = _split_claim_file(args.claim_file, args.claim)
    for kind, flag in _FILE_KINDS.items():
        if in_file.get(kind) and getattr(args, flag[2:].replace("-", "_"), None):
            raise ExplainInputError(f"{args.claim_file} holds {kind} objects and {flag} gives more; give them in "
                                    "one place")
    file_slices = in_file.get("ResourceSlice") or []
    cluster: dict = {}
    if not args.claim_file or not (args.slices or file_slices):
        cluster = asyncio.run(_from_cluster(args, None if args.claim_file else args.claim))
    if not args.claim_file:
        claim = claim_from(cluster["claim"], f"claim {args.claim}")
    from_cluster = not args.slices and not file_slices
    slices = _load_docs(args.slices, "--slices") if args.slices else file_slices or cluster["slices"]
    wrong = sorted({str(s.get("kind")) for s in slices if s.get("kind", "ResourceSlice") != "ResourceSlice"})
    slices = [s for s in slices if s.get("kind", "ResourceSlice") == "ResourceSlice"]
    if not slices:
        raise ExplainInputError("no ResourceSlices found" + (f" (only {', '.join(wrong)})" if wrong else "") +
                                (" in the cluster: is the Partita plugin running on the GPU nodes?" if from_cluster
                                 else " in --slices: pass files or directories of ResourceSlice objects"))
    if args.classes or in_file.get("DeviceClass"):
        classes_list = _load_docs(args.classes, "--classes") if args.classes else in_file["DeviceClass"]
    elif from_cluster:
        classes_list = cluster["classes"]
    else:
        drivers = sorted({(s.get("spec") or {}).get("driver") or C.DEFAULT_DRIVER_NAME for s in slices})
        classes_list = [c for d in drivers for c in device_classes(d)]
    classes = {c["metadata"]["name"]: c for c in classes_list
               if c.get("kind", "DeviceClass") == "DeviceClass" and (c.get("metadata") or {}).get("name")}
    if args.allocated:
        allocated = [c for c in _load_docs(args.allocated, "--allocated")
                     if c.get("kind", "ResourceClaim") == "ResourceClaim"]
    else:
        allocated = cluster.get("claims", []) if from_cluster or (args.claim and not args.claim_file) else []
    allocated = allocated + [c for c in file_claims if (c.get("status") or {}).get("allocation")]
    nodes = _nodes(_load_docs(args.nodes, "--nodes")) if args.nodes else \
        _nodes(in_file.get("Node") or cluster.get("nodes", []))
    taint_rules = getattr(args, "taint_rules", None)
    rules = _load_docs(taint_rules, "--taint-rules") if taint_rules else \
        in_file.get(TAINT_RULE_KIND) or cluster.get("taintrules", [])
    if rules:
        slices = _with_taint_rules(slices, rules, classes, "--taint-rules" if taint_rules else
                                   str(args.claim_file) if in_file.get(TAINT_RULE_KIND) else "the cluster")
    explainer = Explainer(slices, classes, [c for c in allocated if objects.key(c) != objects.key(claim)],
                          managed_toleration=args.allocation_mode == C.ALLOCATION_MODE_CONTROLLER, nodes=nodes)
    return explainer.explain(claim)


__all__ = ["add_arguments", "claim_from", "run"]
