"""The sandbox's API emulator behaves like the API server where Partita's clients depend on it."""

from __future__ import annotations

import asyncio
import json

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from controller.sandbox.apiserver import ApiServer


@pytest.fixture
def server():
    s = ApiServer(bookmark_interval=0.2, log_size=50)
    s.start_in_thread()
    yield s
    s.stop_in_thread()


@pytest.fixture
def apis(server):
    api = client.ApiClient(server.client_configuration())
    return client.CoreV1Api(api), client.ResourceV1Api(api), api


def _slice(name, node="n1", driver="d", devices=None):
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": name},
            "spec": {"driver": driver, "nodeName": node, "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                     "devices": devices if devices is not None else [{"name": "x"}]}}


def _claim(name="c1"):
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": name},
            "spec": {"devices": {"requests": [{"name": "g", "exactly": {"deviceClassName": "gpu.partita.dev"}}]}}}


def _status(e: ApiException) -> int:
    return e.status


def test_crud_metadata_generate_name_and_conflicts(apis) -> None:
    core, res, _ = apis
    a = res.create_resource_slice(_slice("s1"))
    assert a.metadata.uid and a.metadata.generation == 1 and int(a.metadata.resource_version) > 0
    with pytest.raises(ApiException) as e:
        res.create_resource_slice(_slice("s1"))
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    g = core.create_namespaced_config_map("default", {"metadata": {"generateName": "cm-"}})
    assert g.metadata.name.startswith("cm-") and len(g.metadata.name) > 3
    body = res.read_resource_slice("s1").to_dict()
    body["spec"]["devices"] = [{"name": "y"}]
    b = res.replace_resource_slice("s1", body)
    assert b.metadata.generation == 2 and b.metadata.uid == a.metadata.uid
    stale = dict(body)
    stale["metadata"] = dict(body["metadata"], resource_version=a.metadata.resource_version)
    with pytest.raises(ApiException) as e:     # stale resourceVersion on PUT
        res.replace_resource_slice("s1", stale)
    assert e.value.status == 409
    with pytest.raises(ApiException) as e:     # stale resourceVersion in a merge patch
        res.patch_resource_slice("s1", {"metadata": {"resourceVersion": a.metadata.resource_version, "labels": {"x": "1"}}},
                                 _content_type="application/merge-patch+json")
    assert e.value.status == 409
    res.patch_resource_slice("s1", {"metadata": {"labels": {"x": "1"}}}, _content_type="application/merge-patch+json")
    with pytest.raises(ApiException) as e:     # JSON patch test op failing -> 422 (kopf relies on it)
        res.patch_resource_slice("s1", [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}])
    assert e.value.status == 422
    res.delete_resource_slice("s1")
    with pytest.raises(ApiException) as e:
        res.read_resource_slice("s1")
    assert e.value.status == 404


def test_selectors_and_deletecollection(apis) -> None:
    core, res, _ = apis
    for n, node, drv in (("a", "n1", "d"), ("b", "n2", "d"), ("c", "n1", "other")):
        res.create_resource_slice(_slice(n, node, drv))
    names = lambda **kw: sorted(x.metadata.name for x in res.list_resource_slice(**kw).items)  # noqa: E731
    assert names(field_selector="spec.nodeName=n1,spec.driver=d") == ["a"]
    assert names(field_selector="spec.driver!=d") == ["c"]
    core.create_node({"metadata": {"name": "x1", "labels": {"zone": "a", "gpu": "h100"}}})
    core.create_node({"metadata": {"name": "x2", "labels": {"zone": "b"}}})
    lbl = lambda s: sorted(n.metadata.name for n in core.list_node(label_selector=s).items)  # noqa: E731
    assert lbl("zone in (a,c)") == ["x1"] and lbl("zone notin (a)") == ["x2"] and lbl("gpu") == ["x1"]
    assert lbl("!gpu") == ["x2"] and lbl("zone!=a") == ["x2"] and lbl("zone==b") == ["x2"]
    res.delete_collection_resource_slice(field_selector="spec.nodeName=n1")
    assert names() == ["b"]


def test_status_subresource_semantics_and_finalizers(apis, server) -> None:
    _, res, _ = apis
    c = res.create_namespaced_resource_claim("default", {**_claim(), "status": {"allocation": {"devices": {}}}})
    assert c.status is None                                     # create drops status
    body = res.read_namespaced_resource_claim("c1", "default").to_dict()
    body["metadata"]["finalizers"] = ["partita.dev/allocation"]
    body["status"] = {"allocation": {"devices": {"results": []}}}
    res.replace_namespaced_resource_claim("c1", "default", body)   # main write: status ignored
    cur = server.get("resourceclaims", "c1", "default")
    assert "status" not in cur and cur["metadata"]["finalizers"] == ["partita.dev/allocation"]
    alloc = {"devices": {"results": [{"request": "g", "driver": "d", "pool": "p", "device": "x"}]}}
    cur["status"] = {"allocation": alloc}
    cur["metadata"]["finalizers"] = []                               # dropped: finalizers via /status
    res.replace_namespaced_resource_claim_status("c1", "default", cur)
    cur = server.get("resourceclaims", "c1", "default")
    assert cur["status"]["allocation"] == alloc and cur["metadata"]["finalizers"] == ["partita.dev/allocation"]
    changed = dict(cur, status={"allocation": {"devices": {"results": []}}})
    with pytest.raises(ApiException) as e:                           # allocation is immutable
        res.replace_namespaced_resource_claim_status("c1", "default", changed)
    assert e.value.status == 422 and "immutable" in e.value.body
    res.delete_namespaced_resource_claim("c1", "default")            # finalizer: only marked
    cur = server.get("resourceclaims", "c1", "default")
    assert cur["metadata"]["deletionTimestamp"]
    cur["status"]["reservedFor"] = [{"resource": "pods", "name": "p", "uid": "u1"}]
    with pytest.raises(ApiException) as e:                           # no new consumers while deleting
        res.replace_namespaced_resource_claim_status("c1", "default", cur)
    assert e.value.status == 422
    res.patch_namespaced_resource_claim("c1", "default", {"metadata": {"finalizers": None}},
                                        _content_type="application/merge-patch+json")
    assert server.get("resourceclaims", "c1", "default") is None


def test_a_node_keeps_its_status_on_create_and_a_pod_does_not(apis, server) -> None:
    """The kubelet registers its Node with capacity and allocatable; the node strategy keeps them (upstream
    PrepareForCreate: "Nodes allow *all* fields, including status, to be set on create"); pods start Pending."""
    core, _, _ = apis
    core.create_node({"metadata": {"name": "n1"}, "status": {"allocatable": {"pods": "110", "cpu": "8"}}})
    assert server.get("nodes", "n1")["status"]["allocatable"] == {"pods": "110", "cpu": "8"}
    core.create_namespaced_pod("default", {"metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "busybox"}]}, "status": {"phase": "Running", "hostIP": "10.0.0.1"}})
    assert server.get("pods", "p", "default")["status"] == {"phase": "Pending"}


def test_reserved_for_needs_an_allocation(apis, server) -> None:
    _, res, _ = apis
    res.create_namespaced_resource_claim("default", _claim())
    cur = server.get("resourceclaims", "c1", "default")
    cur["status"] = {"reservedFor": [{"resource": "pods", "name": "p", "uid": "u"}]}
    with pytest.raises(ApiException) as e:
        res.replace_namespaced_resource_claim_status("c1", "default", cur)
    assert e.value.status == 422


def test_binding_and_garbage_collection(apis, server) -> None:
    core, res, _ = apis
    pod = core.create_namespaced_pod("default", {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})
    claim = _claim("p-gpu")
    claim["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": pod.metadata.uid,
                                             "controller": True}]
    res.create_namespaced_resource_claim("default", claim)
    core.create_namespaced_pod_binding("p", "default", {"metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}},
                                       _preload_content=False)
    assert server.get("pods", "p", "default")["spec"]["nodeName"] == "n1"
    with pytest.raises(ApiException) as e:
        core.create_namespaced_pod_binding("p", "default", {"metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n2"}},
                                           _preload_content=False)
    assert e.value.status == 409
    node = core.create_node({"metadata": {"name": "n1"}})
    s = _slice("s-n1")
    s["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": node.metadata.uid}]
    res.create_resource_slice(s)
    core.delete_namespaced_pod("p", "default")
    core.delete_node("n1")
    assert server.get("resourceclaims", "p-gpu", "default") is None and server.list("resourceslices") == []


def test_watch_initial_resume_selectors_bookmarks_and_410(apis, server) -> None:
    _, res, _ = apis
    res.create_resource_slice(_slice("a"))
    lst = res.list_resource_slice()
    rv = lst.metadata.resource_version
    res.create_resource_slice(_slice("b", node="n2"))
    res.patch_resource_slice("a", {"spec": {"nodeName": "n2"}}, _content_type="application/merge-patch+json")
    res.delete_resource_slice("b")
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        res.list_resource_slice, resource_version=rv, field_selector="spec.nodeName=n2", timeout_seconds=1)]
    assert events == [("ADDED", "b"), ("ADDED", "a"), ("DELETED", "b")]   # 'a' moved into the selector
    initial = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(res.list_resource_slice, timeout_seconds=1)]
    assert initial == [("ADDED", "a")]
    for i in range(60):                                # overflow the 50-entry log
        res.create_resource_slice(_slice(f"x{i}"))
    raw = res.list_resource_slice(_preload_content=False, watch=True, resource_version=rv, timeout_seconds=1)
    first = json.loads(raw.data.decode().splitlines()[0])
    assert first["type"] == "ERROR" and first["object"]["code"] == 410
    raw = res.list_resource_slice(_preload_content=False, watch=True, resource_version=str(server.resource_version),
                                                          allow_watch_bookmarks=True, timeout_seconds=1)
    kinds = {json.loads(line)["type"] for line in raw.data.decode().splitlines()}
    assert kinds == {"BOOKMARK"}


def test_send_initial_events_ends_with_a_bookmark(apis) -> None:
    _, res, _ = apis
    res.create_resource_slice(_slice("a"))
    raw = res.list_resource_slice(_preload_content=False, watch=True, send_initial_events=True,
                                                          resource_version_match="NotOlderThan", timeout_seconds=1)
    lines = [json.loads(x) for x in raw.data.decode().splitlines()]
    assert lines[0]["type"] == "ADDED"
    assert lines[1]["type"] == "BOOKMARK"
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_feature_gate_field_dropping(apis, server) -> None:
    _, res, _ = apis
    server.drop_features({"DRADeviceTaints", "DRAPartitionableDevices", "DRAConsumableCapacity"})
    dev = {"name": "x", "taints": [{"key": "k", "effect": "NoSchedule"}], "allowMultipleAllocations": True,
           "consumesCounters": [{"counterSet": "c", "counters": {"m": {"value": "1"}}}],
           "capacity": {"memory": {"value": "1Gi", "requestPolicy": {"default": "1Gi"}}}}
    stored = server.get("resourceslices", res.create_resource_slice(_slice("a", devices=[dev])).metadata.name)
    d = stored["spec"]["devices"][0]
    assert "taints" not in d and "consumesCounters" not in d and "allowMultipleAllocations" not in d
    assert d["capacity"]["memory"] == {"value": "1Gi"}
    counters = {**_slice("c"), "spec": {**_slice("c")["spec"], "devices": None, "sharedCounters": [{"name": "c", "counters": {}}]}}
    del counters["spec"]["devices"]
    assert "sharedCounters" not in server.get("resourceslices", res.create_resource_slice(counters).metadata.name)["spec"]
    with pytest.raises(ValueError):
        server.drop_features({"NoSuchGate"})


def test_fault_injection_does_not_change_state(apis, server) -> None:
    _, res, _ = apis
    server.inject_fault("resourceslices", "create", 503, count=2)
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            res.create_resource_slice(_slice("a"))
        assert e.value.status == 503
    assert server.list("resourceslices") == []
    res.create_resource_slice(_slice("a"))
    assert len(server.list("resourceslices")) == 1


def test_aio_client_and_python_store_api(server) -> None:
    from kubernetes.aio import client as aclient

    async def run():
        async with aclient.ApiClient(server.aio_client_configuration()) as api:
            res = aclient.ResourceV1Api(api)
            await res.create_resource_slice(_slice("a"))
            got = await res.list_resource_slice(field_selector="spec.driver=d")
            assert [s.metadata.name for s in got.items] == ["a"]
    asyncio.run(run())
    created = server.create({**_claim("seeded"), "metadata": {"name": "seeded", "namespace": "default"},
                             "status": {"allocation": {"devices": {"results": []}}}})
    assert created["status"]["allocation"] == {"devices": {"results": []}}   # the store API keeps status
    assert [c["metadata"]["name"] for c in server.list("resourceclaims")] == ["seeded"]


def test_wait_for_and_kopf_end_to_end() -> None:
    import kopf

    seen: list = []
    registry = kopf.OperatorRegistry()
    srv = ApiServer(bookmark_interval=0.5)

    @kopf.on.login(registry=registry)
    def login(**_):
        return srv.kopf_connection()

    @kopf.on.startup(registry=registry)
    def setup(settings: kopf.OperatorSettings, **_):
        settings.peering.standalone = True
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="partita.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="partita.dev", key="last")
        settings.persistence.finalizer = "partita.dev/kopf"
        settings.watching.server_timeout = 10

    @kopf.on.event("resource.k8s.io", "v1", "resourceclaims", registry=registry)
    def on_claim(name, type, **_):  # noqa: A002
        seen.append((type, name))

    @kopf.on.create("", "v1", "pods", registry=registry)
    def on_pod(name, patch, **_):
        patch.metadata.labels["handled"] = "yes"

    async def main():
        await srv.start()
        stop = asyncio.Event()
        task = asyncio.create_task(kopf.operator(registry=registry, stop_flag=stop, standalone=True, clusterwide=True))
        try:
            srv.create({**_claim(), "metadata": {"name": "c1", "namespace": "default"}})
            srv.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p1", "namespace": "default"},
                        "spec": {"containers": []}})
            await srv.wait_for(lambda s: ((s.get("pods", "p1", "default") or {}).get("metadata", {})
                                          .get("labels", {}).get("handled")), timeout=15)
            await srv.wait_for(lambda s: any(n == "c1" for _, n in seen), timeout=5)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await srv.stop()
    asyncio.run(main())
