"""driver/api/nodeselector.py: the one home of node selector matching, with upstream's nodeaffinity semantics
(k8s.io/component-helpers/scheduling/corev1/nodeaffinity): NewNodeSelector (strict) for the allocator,
NewLazyErrorNodeSelector for kube-scheduler's filter and the plugin's check, the same parse rules in both."""

from __future__ import annotations

import pytest

from controller.allocator import nodeselector as allocator_nodeselector
from controller.allocator.types import Node
from driver.api.nodeselector import (NodeFacts, NodeSelectorError, node_matches, node_matches_lazily,
                                     requirement_error, selector_mismatch)

NODE = Node("node-a", {"zone": "a", "gpus": "4", "example.com/tier": "gold"})


def _expr(key: str, op: str, *values: str) -> dict:
    return {"nodeSelectorTerms": [{"matchExpressions": [{"key": key, "operator": op, "values": list(values)}]}]}


def _field(op: str, *values: str, key: str = "metadata.name") -> dict:
    return {"nodeSelectorTerms": [{"matchFields": [{"key": key, "operator": op, "values": list(values)}]}]}


@pytest.mark.parametrize(("selector", "want"), [
    (_expr("zone", "In", "a", "b"), True), (_expr("zone", "In", "b"), False),
    (_expr("zone", "NotIn", "b"), True), (_expr("absent", "NotIn", "b"), True),
    (_expr("zone", "Exists"), True), (_expr("absent", "DoesNotExist"), True),
    (_expr("gpus", "Gt", "3"), True), (_expr("gpus", "Lt", "4"), False), (_expr("gpus", "Gt", "+3"), True),
    (_expr("zone", "Gt", "1"), False),                   # a label that is not an integer never matches Gt/Lt
    (_expr("example.com/tier", "In", "gold"), True),
    (_field("In", "node-a"), True), (_field("NotIn", "node-a"), False),
    # a field a node does not have reads as empty (fields.Set): In never matches, NotIn always does
    (_field("In", "x", key="metadata.uid"), False), (_field("NotIn", "x", key="metadata.uid"), True),
    ({"nodeSelectorTerms": [{}, _field("In", "node-a")["nodeSelectorTerms"][0]]}, True),   # empty terms: nothing
    ({"nodeSelectorTerms": [{}]}, False), ({"nodeSelectorTerms": []}, False), ({}, False),
])
def test_valid_selectors_match_as_upstream_in_both_forms(selector, want) -> None:
    assert node_matches(NODE, selector) is want
    assert node_matches_lazily(NODE, selector) is want
    assert (selector_mismatch(selector, NodeFacts(NODE.name, NODE.labels)) is None) is (want or not selector)


@pytest.mark.parametrize(("req", "field", "why"), [
    ({"key": "zone", "operator": "Near", "values": ["a"]}, False, "operator 'Near'"),
    ({"key": "zone", "operator": "In", "values": []}, False, "has no values"),
    ({"key": "zone", "operator": "NotIn"}, False, "has no values"),
    ({"key": "zone", "operator": "Exists", "values": ["a"]}, False, "must not have values"),
    ({"key": "gpus", "operator": "Gt", "values": ["3", "4"]}, False, "exactly one integer"),
    ({"key": "gpus", "operator": "Lt", "values": ["three"]}, False, "is not an integer"),
    ({"key": "gpus", "operator": "Gt", "values": [str(2**63)]}, False, "is not an integer"),   # not an int64
    ({"key": "bad key", "operator": "Exists"}, False, "key 'bad key'"),
    ({"key": "Bad_Prefix/tier", "operator": "Exists"}, False, "is not a label key"),
    ({"key": "zone", "operator": "In", "values": ["not a value"]}, False, "not a valid label value"),
    ({"key": "metadata.name", "operator": "In", "values": ["a", "b"]}, True, "exactly one value"),
    ({"key": "metadata.name", "operator": "Exists"}, True, "operator 'Exists'"),
])
def test_what_upstream_cannot_parse(req, field, why) -> None:
    assert why in (requirement_error(req, field=field) or "")


def test_a_malformed_term_is_an_error_strictly_and_matches_nothing_lazily() -> None:
    bad = {"matchExpressions": [{"key": "zone", "operator": "In", "values": []}]}
    good = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    # NewNodeSelector: any parse error fails the whole selector, even when another term matches
    with pytest.raises(NodeSelectorError, match=r"nodeSelectorTerms\[0\]: matchExpressions zone In has no values"):
        node_matches(NODE, {"nodeSelectorTerms": [bad, good]})
    # LazyErrorNodeSelector: the malformed term matches nothing, the others decide
    assert node_matches_lazily(NODE, {"nodeSelectorTerms": [bad, good]})
    assert not node_matches_lazily(NODE, {"nodeSelectorTerms": [bad]})
    reasons = selector_mismatch({"nodeSelectorTerms": [bad]}, NodeFacts(NODE.name, NODE.labels))
    assert reasons == ["term 0: matchExpressions zone In has no values"]


def test_the_allocator_and_the_scheduler_filter_use_this_home() -> None:
    from controller.operator.nodefit import NodeInfo, node_affinity

    assert allocator_nodeselector.node_matches is node_matches
    assert allocator_nodeselector.NodeSelectorError is NodeSelectorError
    # what the allocator's own copy got wrong: NotIn without values matched, a field with two values was taken
    with pytest.raises(NodeSelectorError):
        allocator_nodeselector.node_matches(NODE, _expr("zone", "NotIn"))
    with pytest.raises(NodeSelectorError):
        allocator_nodeselector.node_matches(NODE, _field("In", "node-a", "node-b"))
    # kube-scheduler's NodeAffinity filter (required affinity): lazily, a malformed term does not hide a good one
    pod = {"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]},
                              {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-a"]}]}]}}}}}
    assert node_affinity(pod, NodeInfo({"metadata": {"name": NODE.name, "labels": dict(NODE.labels)}})) == ""


def test_qualified_names_and_label_values_as_apimachinery_validates_them() -> None:
    from driver.api.naming import is_label_value, is_qualified_name

    assert all(is_qualified_name(k) for k in ("zone", "example.com/tier", "a.b_c-d", "Z9", "x" * 63))
    assert not any(is_qualified_name(k) for k in ("", "/x", "a/", "Bad.Prefix/x", "a/b/c", "-x", "x" * 64, 3))
    assert all(is_label_value(v) for v in ("", "a", "A-b_c.9", "x" * 63))
    assert not any(is_label_value(v) for v in ("-a", "a ", "x" * 64, None))
