"""driver/api/objects.py: the read-only views of claims and pods every layer uses."""

from driver.api import objects as o


def _claim(requests, status=None, config=None):
    c = {"kind": "ResourceClaim", "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
         "spec": {"devices": {"requests": requests, **({"config": config} if config else {})}}}
    if status is not None:
        c["status"] = status
    return c


def test_request_specs_name_exactly_and_subrequests_as_results_do():
    claim = _claim([{"name": "a", "exactly": {"deviceClassName": "gpu.partita.dev"}},
                    {"name": "b", "firstAvailable": [{"name": "big", "deviceClassName": "mig.partita.dev"},
                                                     {"name": "small", "deviceClassName": "shared.partita.dev"}]}])
    specs = list(o.request_specs(claim))
    assert [s.full_name for s in specs] == ["a", "b/big", "b/small"]
    assert [(s.request, s.subrequest) for s in specs] == [("a", None), ("b", "big"), ("b", "small")]
    assert specs[2].path == "spec.devices.requests[1].firstAvailable[1]"
    assert specs[0].path == "spec.devices.requests[0].exactly"
    assert o.device_class_names(claim) == ["gpu.partita.dev", "mig.partita.dev", "shared.partita.dev"]


def test_malformed_claims_read_as_absent_and_are_not_mutated():
    for bad in ({}, {"spec": None}, {"spec": {"devices": {"requests": "x"}}},
                {"spec": {"devices": {"requests": [None, 3, {"name": "r", "firstAvailable": [None]}]}}}):
        assert list(o.request_specs(bad)) == []
        assert o.allocated_results(bad) == [] and o.allocated_node(bad) is None
    claim = _claim([{"name": "a", "exactly": {}}])
    before = repr(claim)
    list(o.request_specs(claim)), o.device_class_names(claim), o.allocated_node(claim)
    assert repr(claim) == before


def test_allocated_node_only_for_a_single_node_pin():
    def alloc(sel):
        return _claim([], status={"allocation": {"nodeSelector": sel, "devices": {"results": [{"device": "gpu-0"}]}}})
    one = {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}
    assert o.allocated_node(alloc(one)) == "n1"
    assert o.allocated_results(alloc(one)) == [{"device": "gpu-0"}]
    two = {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1", "n2"]}]}]}
    assert o.allocated_node(alloc(two)) is None
    labels = {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}
    assert o.allocated_node(alloc(labels)) is None
    assert o.allocated_node(_claim([])) is None


def test_pod_claim_names_resolve_templates_through_status():
    pod = {"spec": {"resourceClaims": [{"name": "direct", "resourceClaimName": "shared-claim"},
                                       {"name": "tmpl", "resourceClaimTemplateName": "t"},
                                       {"name": "later", "resourceClaimTemplateName": "t"},
                                       {"name": "unneeded", "resourceClaimTemplateName": "t"}]},
           "status": {"resourceClaimStatuses": [{"name": "tmpl", "resourceClaimName": "pod-tmpl-x1"},
                                                {"name": "unneeded"}]}}
    assert o.pod_claim_names(pod) == ["shared-claim", "pod-tmpl-x1"]
    assert o.pod_claims_pending_generation(pod) == ["later"]


def test_metadata_views():
    claim = _claim([])
    assert (o.name(claim), o.namespace(claim), o.uid(claim), o.key(claim)) == ("c", "ns", "u1", "ns/c")
    assert o.ref(claim) == "ResourceClaim ns/c"
    assert o.key({"metadata": {"name": "node-1"}}) == "node-1"
    assert not o.is_deleting(claim)
    assert o.is_deleting({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})


def test_malformed_requests_name_the_entries_that_are_not_objects():
    assert o.malformed_requests({"spec": {"devices": {"requests": [{"name": "a"}, "b", None]}}}) == \
        ["spec.devices.requests[1]", "spec.devices.requests[2]"]
    assert o.malformed_requests({"spec": {"devices": {"requests": {"name": "a"}}}}) == ["spec.devices.requests"]
    assert o.malformed_requests({"spec": {"devices": {"requests": [{"name": "a"}]}}}) == []
    assert o.malformed_requests({}) == []


def test_pod_claims_resolve_as_upstream_resourceclaim_name():
    pod = {"spec": {"resourceClaims": [{"name": "direct", "resourceClaimName": "shared-claim"},
                                       {"name": "tmpl", "resourceClaimTemplateName": "t"},
                                       {"name": "later", "resourceClaimTemplateName": "t"},
                                       {"name": "invalid"},                       # neither: not a claim
                                       {"name": "stale-status"}]},                # neither, though a status names it
           "status": {"resourceClaimStatuses": [{"name": "tmpl", "resourceClaimName": "pod-tmpl-x1"},
                                                {"name": "stale-status", "resourceClaimName": "leftover"}]}}
    assert o.pod_claims(pod) == [o.PodClaim("direct", "shared-claim"), o.PodClaim("tmpl", "pod-tmpl-x1"),
                                 o.PodClaim("later", None)]
    assert o.pod_claim_names(pod) == ["shared-claim", "pod-tmpl-x1"]      # "leftover" is no claim of the pod
    assert o.pod_claims({"spec": {"resourceClaims": "x"}}) == []


def test_request_tolerations_one_list_per_request_and_subrequest():
    tol = {"key": "maintenance", "operator": "Exists"}
    claim = {"spec": {"devices": {"requests": [
        {"name": "a", "exactly": {"deviceClassName": "c", "tolerations": [tol]}},
        {"name": "b", "firstAvailable": [{"name": "x", "deviceClassName": "c"},
                                         {"name": "y", "deviceClassName": "c", "tolerations": [tol, "bad"]}]}]}}}
    assert o.request_tolerations(claim) == [[tol], [], [tol]]
