"""The allocator's upstream semantics, one behaviour per test (fixtures cover the shared cases)."""

from __future__ import annotations

import pytest

from controller.allocator import AllocatedState, AllocationError, DeviceID, Features
from tests.support.alloc import allocate, claim, cls, dev, devices_of, first, req, slice_, sub

A = "driver-a"


def test_exact_count_takes_devices_in_pool_slice_device_order() -> None:
    (r,) = allocate([claim("c", req(count=2))], [slice_("s2", [dev("d3")], pool="pool-2"),
                                                 slice_("s1", [dev("d1"), dev("d2")])])
    assert devices_of(r) == [("req-0", "pool-1", "d1"), ("req-0", "pool-1", "d2")]
    assert r["nodeSelector"] == {"nodeSelectorTerms": [{"matchFields": [
        {"key": "metadata.name", "operator": "In", "values": ["node-1"]}]}]}
    assert "allocationTimestamp" not in r and "config" not in r["devices"]


def test_allocated_devices_are_skipped_and_unsatisfiable_is_none() -> None:
    s = slice_("s1", [dev("d1"), dev("d2")])
    state = AllocatedState(devices={DeviceID(A, "pool-1", "d1")})
    (r,) = allocate([claim("c", req())], [s], state=state)
    assert devices_of(r) == [("req-0", "pool-1", "d2")]
    assert allocate([claim("c", req(count=2))], [s], state=state) is None


def test_several_claims_never_share_a_dedicated_device() -> None:
    res = allocate([claim("a", req()), claim("b", req())], [slice_("s1", [dev("d1"), dev("d2")])])
    assert [devices_of(r)[0][2] for r in res] == ["d1", "d2"]
    assert allocate([claim("a", req()), claim("b", req())], [slice_("s1", [dev("d1")])]) is None


def test_mode_all_needs_every_matching_device_and_at_least_one() -> None:
    s = slice_("s1", [dev("d1", {"t": "x"}), dev("d2", {"t": "y"}), dev("d3", {"t": "x"})])
    (r,) = allocate([claim("c", req(mode="All", selectors=['device.attributes["driver-a"].t == "x"']))], [s])
    assert [d for _, _, d in devices_of(r)] == ["d1", "d3"]
    state = AllocatedState(devices={DeviceID(A, "pool-1", "d3")})
    assert allocate([claim("c", req(mode="All"))], [s], state=state) is None
    assert allocate([claim("c", req(mode="All", selectors=['device.attributes["driver-a"].t == "z"']))], [s]) is None


def test_first_available_falls_back_and_names_the_subrequest() -> None:
    classes = [cls("class-a"), cls("class-b", 'device.driver == "driver-b"')]
    c = claim("c", first("req-0", sub("big", "class-b"), sub("small", "class-a")))
    (r,) = allocate([c], [slice_("s1", [dev("d1")])], classes)
    assert devices_of(r) == [("req-0/small", "pool-1", "d1")]
    assert allocate([claim("c", first("req-0", sub("big", "class-b", count=2), sub("small", "class-a", count=2)))],
                    [slice_("s1", [dev("d1")])], classes) is None


def test_backtracking_across_requests() -> None:
    s = slice_("s1", [dev("small", cap={"memory": "1Gi"}), dev("large", cap={"memory": "16Gi"})])
    c = claim("c", req("any"), req("big", selectors=['device.capacity["driver-a"].memory.compareTo(quantity("10Gi")) >= 0']))
    (r,) = allocate([c], [s])
    assert devices_of(r) == [("any", "pool-1", "small"), ("big", "pool-1", "large")]
    c = claim("c", req("big", selectors=['device.capacity["driver-a"].memory.isGreaterThan(quantity("10Gi"))']), req("any"))
    assert [d for _, _, d in devices_of(allocate([c], [s])[0])] == ["large", "small"]


def test_match_attribute_constraint() -> None:
    s = slice_("s1", [dev("d1", {"numa": 0}), dev("d2", {"numa": 1}), dev("d3", {"numa": 1})])
    c = claim("c", req(count=2), constraints=[{"matchAttribute": "driver-a/numa"}])
    assert [d for _, _, d in devices_of(allocate([c], [s])[0])] == ["d2", "d3"]
    c = claim("c", req(count=2), constraints=[{"matchAttribute": "driver-a/missing"}])
    assert allocate([c], [s]) is None


def test_distinct_attribute_constraint() -> None:
    s = slice_("s1", [dev("d1", {"numa": 0}), dev("d2", {"numa": 0}), dev("d3", {"numa": 1})])
    c = claim("c", req("a"), req("b"), constraints=[{"distinctAttribute": "driver-a/numa"}])
    assert [d for _, _, d in devices_of(allocate([c], [s])[0])] == ["d1", "d3"]


def test_admin_access_uses_allocated_devices_and_marks_results() -> None:
    s = slice_("s1", [dev("d1"), dev("d2")])
    state = AllocatedState(devices={DeviceID(A, "pool-1", "d1")})
    (r,) = allocate([claim("c", req(count=2, adminAccess=True))], [s], state=state)
    assert [x.get("adminAccess") for x in r["devices"]["results"]] == [True, True]
    with pytest.raises(AllocationError, match="admin access is requested, but the feature is disabled"):
        allocate([claim("c", req(adminAccess=True))], [s], features=Features(admin_access=False))


def test_taints_need_tolerations_which_are_copied_to_results() -> None:
    taint = {"key": "example.com/t", "value": "v", "effect": "NoSchedule"}
    s = slice_("s1", [dev("d1", taints=[taint]), dev("d2", taints=[{**taint, "effect": "None"}])])
    (r,) = allocate([claim("c", req())], [s])
    assert devices_of(r) == [("req-0", "pool-1", "d2")]          # None effect is ignored
    tol = {"key": "example.com/t", "operator": "Exists", "effect": "NoSchedule"}
    (r,) = allocate([claim("c", req(tolerations=[tol]))], [s])
    assert devices_of(r)[0][2] == "d1" and r["devices"]["results"][0]["tolerations"] == [tol]
    wrong = {"key": "example.com/t", "operator": "Equal", "value": "other"}
    assert devices_of(allocate([claim("c", req(tolerations=[wrong]))], [s])[0])[0][2] == "d2"
    (r,) = allocate([claim("c", req())], [s], features=Features(device_taints=False))
    assert devices_of(r)[0][2] == "d1"


def _consumes(mem):
    return [{"counterSet": "gpu", "counters": {"mem": {"value": mem}}}]


def test_counters_of_partitionable_devices() -> None:
    counters = slice_("counters", counters={"gpu": {"mem": "8Gi"}}, count=2)
    parts = slice_("devices", [dev(f"p{i}", consumesCounters=_consumes("4Gi")) for i in range(3)]
                   + [dev("whole", consumesCounters=_consumes("8Gi"))], count=2)
    (r,) = allocate([claim("c", req(count=2))], [counters, parts])
    assert [d for _, _, d in devices_of(r)] == ["p0", "p1"]
    assert allocate([claim("c", req(count=3))], [counters, parts]) is None
    # a partition allocated by another claim uses up its share of the counters
    state = AllocatedState(devices={DeviceID(A, "pool-1", "p2")})
    whole = claim("c", req(selectors=['device.attributes["driver-a"].kind == "whole"']))
    parts_with_kind = slice_("devices", [dev(f"p{i}", {"kind": "part"}, consumesCounters=_consumes("4Gi")) for i in range(3)]
                             + [dev("whole", {"kind": "whole"}, consumesCounters=_consumes("8Gi"))], count=2)
    assert allocate([whole], [counters, parts_with_kind]) is not None
    assert allocate([whole], [counters, parts_with_kind], state=state) is None
    # without the feature, slices with counters are ignored and such a pool is never complete
    assert allocate([claim("c", req())], [counters, parts], features=Features(partitionable_devices=False)) is None


def test_all_mode_checks_counters_before_constraints_as_upstream() -> None:
    """Upstream's allocateDevice checks in-use, counters, taints, then constraints: a device of an ``All``
    request that both lacks the constrained attribute and has no counters left makes the node
    unsatisfiable; it is not the fatal "constraint would not be satisfied" error (found by the
    differential test against draalloc)."""
    counters = slice_("counters", counters={"gpu": {"mem": "8Gi"}}, count=2)
    parts = slice_("devices", [dev("p0", {"model": "a"}, consumesCounters=_consumes("4Gi")),
                               dev("p1", {"model": "a"}, consumesCounters=_consumes("4Gi")),
                               dev("p2", consumesCounters=_consumes("4Gi"))], count=2)
    c = claim("c", req(mode="All"), constraints=[{"matchAttribute": "driver-a/model"}])
    assert allocate([c], [counters, parts]) is None
    # with counters left, the same device is the fatal constraint error, as upstream
    roomy = slice_("counters", counters={"gpu": {"mem": "12Gi"}}, count=2)
    with pytest.raises(AllocationError, match="cannot add device driver-a/pool-1/p2 because a claim constraint"):
        allocate([c], [roomy, parts])
    # a device rejected by its constraint gives its counters back: "whole" still fits after p2 was tried
    parts2 = slice_("devices", [dev("p2", {"model": "b"}, consumesCounters=_consumes("8Gi")),
                                dev("w", {"model": "a"}, consumesCounters=_consumes("8Gi"))], count=2)
    anchor_dev = slice_("other", [dev("a0", {"model": "a"})], pool="pool-0")
    c2 = claim("c", req("x", selectors=['device.attributes["driver-a"].model == "a"']), req("y"),
               constraints=[{"matchAttribute": "driver-a/model"}])
    (r,) = allocate([c2], [anchor_dev, counters, parts2])
    assert [d for _, _, d in devices_of(r)] == ["a0", "w"]


def test_device_with_binding_conditions_is_skipped_before_its_class_selector_runs() -> None:
    """Upstream's isSelectable rejects a device with binding conditions (feature off) before any selector:
    a class selector that would fail at runtime on it is no error (found by the differential test)."""
    erring = cls("class-err", 'device.attributes["driver-a"].numa >= 1')
    s = slice_("s1", [dev("d0", bindingConditions=["ready"], bindingFailureConditions=["failed"])])
    for mode in (None, "All"):
        assert allocate([claim("c", req(cls_name="class-err", mode=mode))], [s], [erring]) is None
    with pytest.raises(AllocationError, match="no such key"):
        allocate([claim("c", req(cls_name="class-err"))], [s], [erring], features=Features(device_binding_and_status=True))


def test_shared_devices_get_share_ids_and_consume_capacity() -> None:
    policy = {"default": "1Gi", "validRange": {"min": "1Gi", "step": "1Gi"}}
    s = slice_("s1", [dev("gpu", cap={"memory": {"value": "4Gi", "requestPolicy": policy}}, allowMultipleAllocations=True)])
    claims = [claim(f"c{i}", req(capacity={"requests": {"memory": "1500Mi"}})) for i in range(2)]
    res = allocate(claims, [s])
    ids = [r["devices"]["results"][0]["shareID"] for r in res]
    assert len(set(ids)) == 2 and all(len(i) == 36 for i in ids)
    assert [r["devices"]["results"][0]["consumedCapacity"] for r in res] == [{"memory": "2Gi"}] * 2   # rounded up
    assert allocate(claims + [claim("c3", req(capacity={"requests": {"memory": "1Gi"}}))], [s]) is None
    # capacity already consumed by other claims counts
    from driver.api.quantity import Quantity
    state = AllocatedState(capacity={DeviceID(A, "pool-1", "gpu"): {"memory": Quantity.parse("3Gi")}},
                           shares={(DeviceID(A, "pool-1", "gpu"), "x")})
    assert allocate([claims[0]], [s], state=state) is None
    (r,) = allocate([claim("c", req())], [s], state=state)       # the default (1Gi) still fits
    assert r["devices"]["results"][0]["consumedCapacity"] == {"memory": "1Gi"}


def test_requesting_a_capacity_a_device_lacks_skips_it() -> None:
    s = slice_("s1", [dev("d1", cap={"memory": "4Gi"}), dev("d2", cap={"memory": "4Gi", "cores": "8"})])
    (r,) = allocate([claim("c", req(capacity={"requests": {"cores": "2"}}))], [s])
    assert devices_of(r)[0][2] == "d2"


def test_class_and_claim_config_propagation() -> None:
    opaque = {"opaque": {"driver": A, "parameters": {"x": 1}}}
    classes = [cls("class-a", config=[opaque])]
    c = claim("c", req("r1"), req("r2"), config=[{"requests": ["r2"], "opaque": {"driver": A, "parameters": {"y": 2}}}])
    (r,) = allocate([c], [slice_("s1", [dev("d1"), dev("d2")])], classes)
    assert r["devices"]["config"] == [
        {"source": "FromClass", "opaque": opaque["opaque"]},            # covers every request: requests cleared
        {"source": "FromClaim", "requests": ["r2"], "opaque": {"driver": A, "parameters": {"y": 2}}},
    ]


def test_nodes_and_pools() -> None:
    other = slice_("s-other", [dev("x")], node="node-2", pool="pool-2")
    assert allocate([claim("c", req())], [other]) is None
    labelled = slice_("s-net", [dev("n")], node=None, pool="net", nodeSelector={"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "region", "operator": "In", "values": ["region-1"]}]}]})
    (r,) = allocate([claim("c", req())], [labelled])
    assert r["nodeSelector"] == {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "region", "operator": "In", "values": ["region-1"]}]}]}
    everywhere = slice_("s-all", [dev("a")], node=None, pool="all", allNodes=True)
    (r,) = allocate([claim("c", req())], [everywhere])
    assert "nodeSelector" not in r
    # the newest generation of a pool wins; an incomplete pool is never used
    old = slice_("old", [dev("d-old")], gen=1)
    new = slice_("new", [dev("d-new")], gen=2)
    assert devices_of(allocate([claim("c", req())], [old, new])[0])[0][2] == "d-new"
    incomplete = slice_("half", [dev("d1")], count=2)
    assert allocate([claim("c", req())], [incomplete]) is None
    with pytest.raises(AllocationError, match="currently being updated"):
        allocate([claim("c", req(mode="All"))], [incomplete])


def test_invalid_pools_are_a_node_local_error_only_without_a_solution() -> None:
    dup = [slice_("s1", [dev("d1")], count=2), slice_("s2", [dev("d1")], count=2)]
    good = slice_("s3", [dev("d2")], pool="pool-2")
    (r,) = allocate([claim("c", req())], dup + [good])
    assert devices_of(r)[0][1] == "pool-2"
    with pytest.raises(AllocationError) as e:
        allocate([claim("c", req())], dup)
    assert e.value.node_local and "invalid resource pools" in str(e.value)


@pytest.mark.parametrize(("claim_obj", "classes", "message", "field"), [
    (claim("c", req(cls_name="no-such-class")), None, "could not retrieve device class no-such-class", "deviceClassName"),
    (claim("c", req(cls_name="")), None, "missing device class name", "deviceClassName"),
    (claim("c", req(selectors=["device.driver =="])), None, "CEL compile error", "selectors[0].cel.expression"),
    (claim("c", req(selectors=['device.attributes["driver-a"].nope == 1'])), None, "no such key: nope", "selectors[0].cel.expression"),
    (claim("c", req()), [cls("class-a", "device.attributes['driver-a'].nope")], "class class-a: selector #0", "selectors[0].cel.expression"),
    (claim("c", req(count=-1)), None, "count -1 is invalid", "count"),
    (claim("c", req(count=500)), None, "exceeds the claim limit of 32", "spec.devices.requests"),
    (claim("c", req(count=30), req("r2", count=3)), None, "exceeds the claim limit", "spec.devices.requests"),
    (claim("c", req(capacity={"requests": {"memory": "lots"}})), None, "capacity.requests: quantity 'lots'", "capacity.requests"),
    (claim("c", req(mode="Sometimes")), None, "unsupported count mode Sometimes", "allocationMode"),
    (claim("c", req(), constraints=[{}]), None, "empty constraint", "spec.devices.constraints[0]"),
])
def test_bad_input_is_an_allocation_error_naming_claim_request_and_field(claim_obj, classes, message, field) -> None:
    with pytest.raises(AllocationError) as e:
        allocate([claim_obj], [slice_("s1", [dev("d1")])], classes)
    assert message in str(e.value)
    assert "default/c" in str(e.value)
    assert e.value.field == field


def test_more_than_32_devices_through_all_mode_is_refused() -> None:
    s = slice_("s1", [dev(f"d{i}") for i in range(33)])
    with pytest.raises(AllocationError, match="exceeds the claim limit"):
        allocate([claim("c", req(mode="All"))], [s])


def test_inputs_are_not_modified() -> None:
    import copy

    claims = [claim("c", req(count=2, tolerations=[{"key": "k", "operator": "Exists"}]))]
    slices = [slice_("s1", [dev("d1"), dev("d2", taints=[{"key": "k", "effect": "NoSchedule"}])])]
    before = copy.deepcopy((claims, slices))
    allocate(claims, slices)
    assert (claims, slices) == before


def test_a_request_that_is_not_an_object_is_refused_by_name() -> None:
    from controller.allocator import Allocator, Node, SliceIndex

    claim = {"metadata": {"name": "c", "namespace": "ns"},
             "spec": {"devices": {"requests": [{"name": "a", "exactly": {"deviceClassName": "x"}}, "oops"]}}}
    with pytest.raises(AllocationError) as e:
        Allocator().allocate(Node("n"), [claim], SliceIndex(), {"x": {"metadata": {"name": "x"}}}, AllocatedState())
    assert e.value.field == "spec.devices.requests[1]"
    assert "claim ns/c: spec.devices.requests[1] is not an object" in str(e.value)
