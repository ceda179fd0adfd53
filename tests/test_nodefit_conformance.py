"""kube-scheduler's own Filter test tables, translated into data (tests/fixtures/nodefit/*.yaml), run
against controller/operator/nodefit.py plugin by plugin, as upstream runs them (one plugin in isolation,
so a case may admit a node another plugin would reject: that is upstream's expectation too).

Fixture format (one file per plugin; a comment above each case names the upstream test function and
case; our own translation of kubernetes/kubernetes, Apache-2.0):

    plugin: PodTopologySpread              # a key of nodefit.PLUGINS
    cases:
    - name: ...
      upstream: TestSingleConstraint/<case name>
      pod: {name, namespace, labels, deletionTimestamp, spec: {...}}
      nodes: [{name, labels, taints, unschedulable, allocatable}]
      pods: [{name, namespace, labels, nodeName, spec: {...}}]     # existing pods, bound by nodeName
      namespaces: {name: {labels}}                                  # namespace labels (default: none)
      want: {node-a: fit, node-b: unfit}
      reason: substring of every unfit node's reason (optional)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controller.operator.nodefit import PLUGINS, NodeInfo, Topology

FIXTURES = Path(__file__).parent / "fixtures" / "nodefit"


def _node(d: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": d["name"], "labels": dict(d.get("labels") or {})},
            "spec": {"taints": list(d.get("taints") or []), "unschedulable": bool(d.get("unschedulable"))},
            "status": {"allocatable": dict(d.get("allocatable") or {"pods": "110"})}}


def _pod(d: dict) -> dict:
    md = {"name": d.get("name", "p"), "namespace": d.get("namespace", ""), "labels": dict(d.get("labels") or {})}
    if d.get("deletionTimestamp"):
        md["deletionTimestamp"] = d["deletionTimestamp"]
    spec = dict(d.get("spec") or {})
    spec.setdefault("containers", [{"name": "c", "image": "x"}])
    if d.get("nodeName"):
        spec["nodeName"] = d["nodeName"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec, "status": dict(d.get("status") or {})}


def _cases() -> list:
    out = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        for case in doc["cases"]:
            out.append(pytest.param(doc["plugin"], case, id=f"{path.stem}::{case['name']}"))
    return out


CASES = _cases()


@pytest.mark.parametrize("plugin,case", CASES)
def test_upstream_filter_case(plugin: str, case: dict) -> None:
    assert case.get("upstream"), f"case {case['name']!r} must name the upstream test it translates"
    nodes = [_node(n) for n in case["nodes"]]
    existing = [_pod(p) for p in case.get("pods") or []]
    infos = [NodeInfo(n, [p for p in existing if p["spec"].get("nodeName") == n["metadata"]["name"]]) for n in nodes]
    topo = Topology(infos, {k: dict((v or {}).get("labels") or {}) for k, v in (case.get("namespaces") or {}).items()})
    pod = _pod(case["pod"])
    f = PLUGINS[plugin]
    got = {}
    reasons = {}
    for info in infos:
        why = f(pod, info, topo)
        got[info.name] = "unfit" if why else "fit"
        reasons[info.name] = why
    assert got == case["want"], f"{case['upstream']}: {reasons}"
    if case.get("reason"):
        for n, why in reasons.items():
            if why:
                assert case["reason"] in why, (n, why)


def test_fixtures_cover_every_filter_plugin_with_dozens_of_cases() -> None:
    plugins = {p.values[0] for p in CASES}
    assert plugins == set(PLUGINS), set(PLUGINS) - plugins
    assert len(CASES) >= 60
