"""Hostile input from the kubelet's side and from claim objects, through the plugin's real gRPC path:
claim names that would address other API objects, malformed allocations, errors that echo megabytes.

The claims are read by the real KubeClaimSource over HTTP from a recording API server, so a test sees
every request the plugin makes.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import unquote

import grpc
import pytest
from aiohttp import web

from driver.api import kube as K
from driver.api.kube import InvalidName, Kube
from driver.api.messages import MAX_MESSAGE
from driver.api import naming
from driver.inventory import discover
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubeletapi.dra.v1beta1 import api_pb2 as v1beta1
from driver.kubeletapi.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.claims import KubeClaimSource
from driver.plugin.prepare import DeviceState
from driver.plugin.server import MAX_RESPONSE_BYTES, DraService, PluginServers
from tests.support.claims import FakeClaims, allocated_claim

NODE = "node-a"
DRIVER = "gpu.partita.dev"
#: what an adversarial tester sent as claim names (the first made the plugin GET a Node, the second
#: opened a watch that stalled the call for 30 s)
HOSTILE = [("default", "../../../../../../api/v1/nodes/node-a"), ("default", "x?watch=true"),
           ("../../../../api/v1/nodes/node-a#", "c"), ("default", "a/b"), ("default", "c%2F..%2F..%2Fnodes"),
           ("default", "UPPER"), ("default", "c\n"), ("default", ".."), ("kube-system/x", "c"),
           ("default", "y" * 3_000_000), ("", "c"), ("default", "")]


class RecordingApi:
    """An API server that answers GET of the claims it holds and records every request (method, raw
    path with its query). A Node and a watch are served too, as a real API server would."""

    def __init__(self, *claims: dict):
        self.claims = {K.claim_path(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in claims}
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.raw_path))
        if request.query.get("watch") == "true":
            await asyncio.sleep(30)
        if request.raw_path in self.claims:
            return web.json_response(self.claims[request.raw_path])
        if request.path == "/api/v1/nodes/node-a":
            return web.json_response({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "uid": "n"}})
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                  "message": f"{request.path} not found", "code": 404}, status=404)

    async def __aenter__(self) -> "RecordingApi":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def _state(tmp_path):
    backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:2", NODE), node_name=NODE)
    backend.init()
    inv = discover(backend, NODE)
    return DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=inv, cdi_root=tmp_path / "cdi",
                       plugin_dir=tmp_path / "plugins" / DRIVER, cdi_search_dirs=[]), inv


async def _serve(tmp_path, claims):  # noqa: ANN001
    state, inv = _state(tmp_path)
    servers = PluginServers(DraService(state, claims), driver_name=DRIVER,
                            dra_socket=tmp_path / "plugins" / DRIVER / "dra.sock",
                            registration_socket=tmp_path / "registry" / f"{DRIVER}-reg.sock")
    await servers.start()
    return servers, state, inv


def test_hostile_claim_names_get_a_clear_error_and_reach_no_other_object(tmp_path) -> None:
    async def scenario():
        state, inv = _state(tmp_path)
        good = allocated_claim("good", [naming.gpu_device_name(inv.gpus[0].uuid)])
        async with RecordingApi(good) as api:
            kube = await Kube.connect(api.url)
            servers = PluginServers(DraService(state, KubeClaimSource(kube)), driver_name=DRIVER,
                                    dra_socket=tmp_path / "plugins" / DRIVER / "dra.sock",
                                    registration_socket=tmp_path / "registry" / f"{DRIVER}-reg.sock")
            await servers.start()
            try:
                async with grpc.aio.insecure_channel(f"unix://{servers.dra_socket}") as ch:
                    claims = [v1.Claim(namespace=ns, name=name, uid=f"u{i}") for i, (ns, name) in enumerate(HOSTILE)]
                    claims.append(v1.Claim(namespace="default", name="good", uid=good["metadata"]["uid"]))
                    resp = await asyncio.wait_for(v1_grpc.DRAPluginStub(ch).NodePrepareResources(
                        v1.NodePrepareResourcesRequest(claims=claims)), timeout=20)
                    # v1beta1 takes the same path
                    beta = await asyncio.wait_for(v1beta1_grpc.DRAPluginStub(ch).NodePrepareResources(
                        v1beta1.NodePrepareResourcesRequest(claims=[v1beta1.Claim(
                            namespace="default", name="x?watch=true", uid="ub")])), timeout=20)
                    # unprepare reads nothing from the API server: unknown claims are done, hostile names or not
                    un = await asyncio.wait_for(v1_grpc.DRAPluginStub(ch).NodeUnprepareResources(
                        v1.NodeUnprepareResourcesRequest(claims=claims[:-1])), timeout=20)
            finally:
                await servers.stop()
                await kube.close()
        # the one valid claim was read, at its own path, and nothing else was requested
        assert api.requests == [("GET", "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims/good")]
        assert resp.claims[good["metadata"]["uid"]].error == ""
        for i, (ns, name) in enumerate(HOSTILE):
            err = resp.claims[f"u{i}"].error
            field = "namespace" if name == "c" else "name"
            assert f"the kubelet sent claim uid 'u{i}' with {field} " in err, (ns, name, err)
            assert "is not a valid Kubernetes name" in err and "DNS-1123" in err, err
            assert len(err.encode()) <= MAX_MESSAGE, len(err)            # the 3 MB name is not echoed
        assert "name 'x?watch=true' is not a valid Kubernetes name" in beta.claims["ub"].error
        assert {uid: c.error for uid, c in un.claims.items()} == {f"u{i}": "" for i in range(len(HOSTILE))}
        assert state.prepared_claims().keys() == {good["metadata"]["uid"]}

    asyncio.run(scenario())


@pytest.mark.parametrize("ns, name", HOSTILE)
def test_every_path_helper_refuses_hostile_names_naming_the_field(ns: str, name: str) -> None:
    bad_ns, bad_name = ns != "default" or name == "c", name != "c"
    if bad_name:
        for build in (lambda: K.claim_path("default", name), lambda: K.claim_path("default", name, status=True),
                      lambda: K.slice_path(name), lambda: K.node_path(name),
                      lambda: K.namespaced_path("/apis/coordination.k8s.io/v1", "default", "leases", name,
                                                kind="Lease")):
            with pytest.raises(InvalidName, match=r" name .* is not a valid Kubernetes name: .*DNS-1123 subdomain"):
                build()
    if bad_ns:
        for build in (lambda: K.claims_path(ns) if ns else K.claim_path(ns, "c"), lambda: K.claim_path(ns, "c"),
                      lambda: K.namespaced_path("/api/v1", ns, "events", kind="Event")):
            with pytest.raises(InvalidName, match=r"namespace .* is not a valid Kubernetes name: .*DNS-1123 label"):
                build()


def test_path_helpers_name_the_object_kind_and_keep_valid_names() -> None:
    with pytest.raises(InvalidName, match=r"^Node name 'a/b' is not"):
        K.node_path("a/b")
    with pytest.raises(InvalidName, match=r"^ResourceSlice name"):
        K.slice_path("x?watch=true")
    with pytest.raises(InvalidName, match=r"^ResourceClaim namespace 'a\.b'"):    # a namespace is a label
        K.claim_path("a.b", "c")
    assert K.claim_path("team-a", "my.claim-1", status=True) == \
        "/apis/resource.k8s.io/v1/namespaces/team-a/resourceclaims/my.claim-1/status"
    assert K.node_path("ip-10-0-0-1.ec2.internal") == "/api/v1/nodes/ip-10-0-0-1.ec2.internal"
    assert K.claims_path() == "/apis/resource.k8s.io/v1/resourceclaims"
    assert K.slice_path("n" * 253) and K.claim_path("n" * 63, "c")
    with pytest.raises(InvalidName):
        K.slice_path("n" * 254)
    with pytest.raises(InvalidName):
        K.claim_path("n" * 64, "c")


def test_quoted_segments_reach_the_api_server_as_one_segment() -> None:
    """Quoting is the second line of defence: the HTTP client must not undo it (no '..' resolution, no
    query split) on the way to the server."""
    async def scenario():
        async with RecordingApi() as api:
            async with await Kube.connect(api.url) as kube:
                for hostile in ("../../nodes/node-a", "x?watch=true", "a#b", "%2F"):
                    with pytest.raises(K.KubeError) as e:
                        await asyncio.wait_for(kube.get(f"/apis/resource.k8s.io/v1/resourceslices/{K.segment(hostile)}"),
                                               timeout=10)
                    assert e.value.not_found
        return api.requests

    requests = asyncio.run(scenario())
    assert len(requests) == 4
    for (method, raw), hostile in zip(requests, ("../../nodes/node-a", "x?watch=true", "a#b", "%2F")):
        prefix, _, last = raw.rpartition("/")
        # one segment below the collection, no query, and it decodes back to the name as given
        assert (method, prefix) == ("GET", "/apis/resource.k8s.io/v1/resourceslices") and "?" not in raw
        assert unquote(last) == hostile, raw


def _malformed(inv) -> list[tuple[dict, str]]:  # noqa: ANN001
    gpu = naming.gpu_device_name(inv.gpus[0].uuid)

    def claim(name: str, edit) -> dict:  # noqa: ANN001
        c = allocated_claim(name, [gpu])
        edit(c["status"]["allocation"])
        return c
    R = "status.allocation.devices.results"
    return [
        (claim("no-request", lambda a: a["devices"]["results"][0].pop("request")), f"{R}[0].request is missing"),
        (claim("no-pool", lambda a: a["devices"]["results"][0].pop("pool")), f"{R}[0].pool is missing"),
        (claim("no-device", lambda a: a["devices"]["results"][0].pop("device")), f"{R}[0].device is missing"),
        (claim("empty-driver", lambda a: a["devices"]["results"][0].update(driver="")), f"{R}[0].driver is empty"),
        (claim("int-request", lambda a: a["devices"]["results"][0].update(request=5)),
         f"{R}[0].request must be a string, not 5"),
        (claim("str-result", lambda a: a["devices"].update(results=["gpu-0"])), f"{R}[0] must be an object, not 'gpu-0'"),
        (claim("dict-results", lambda a: a["devices"].update(results={"a": 1})), f"{R} must be a list"),
        (claim("str-devices", lambda a: a.update(devices="x")), "status.allocation.devices must be an object"),
        (claim("share-int", lambda a: a["devices"]["results"][0].update(shareID=7)), f"{R}[0].shareID must be a string"),
        (claim("capacity-int", lambda a: a["devices"]["results"][0].update(consumedCapacity={"memory": {"x": 1}})),
         f"{R}[0].consumedCapacity.memory must be a string, not {{'x': 1}}"),
        (claim("config-str", lambda a: a["devices"].update(config=["x"])),
         "status.allocation.devices.config[0] must be an object"),
        (claim("config-no-source", lambda a: a["devices"].update(config=[{"opaque": {"driver": DRIVER}}])),
         "status.allocation.devices.config[0].source is missing"),
        (claim("opaque-no-driver", lambda a: a["devices"].update(config=[{"source": "FromClaim", "opaque": {}}])),
         "status.allocation.devices.config[0].opaque.driver is missing"),
        (claim("selector-str", lambda a: a.update(nodeSelector={"nodeSelectorTerms": ["x"]})),
         "status.allocation.nodeSelector.nodeSelectorTerms[0] must be an object"),
        ({**allocated_claim("alloc-list", [gpu]), "status": {"allocation": ["x"]}}, "status.allocation must be an object"),
    ]


def test_malformed_allocations_are_named_by_field(tmp_path) -> None:
    async def scenario():
        state, inv = _state(tmp_path)
        cases = _malformed(inv)
        servers, state, inv = await _serve(tmp_path, FakeClaims(*(c for c, _ in cases)))
        try:
            async with grpc.aio.insecure_channel(f"unix://{servers.dra_socket}") as ch:
                resp = await v1_grpc.DRAPluginStub(ch).NodePrepareResources(v1.NodePrepareResourcesRequest(claims=[
                    v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c, _ in cases]))
        finally:
            await servers.stop()
        for c, want in cases:
            err = resp.claims[c["metadata"]["uid"]].error
            assert err.startswith(f"claim default/{c['metadata']['name']}: {want}"), (want, err)
            assert "internal error" not in err
        assert state.prepared_claims() == {}

    asyncio.run(scenario())


def test_a_hundred_claims_with_huge_bad_configs_fit_the_kubelets_4_mib_limit(tmp_path) -> None:
    """Each claim's config error would echo megabytes; the kubelet's client (like this one, on gRPC's
    default 4 MiB receive limit) must still get one answer with every claim's error."""
    async def scenario():
        state, inv = _state(tmp_path)
        gpu = naming.gpu_device_name(inv.gpus[0].uuid)
        huge = "x" * 2_000_000
        many_fields = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
                       **{f"unknownField{i}": i for i in range(5_000)}}
        claims = []
        for i in range(100):
            params = many_fields if i % 2 else {"apiVersion": huge, "kind": "GpuConfig"}
            claims.append(allocated_claim(f"c{i}", [gpu], config=[
                {"source": "FromClaim", "opaque": {"driver": DRIVER, "parameters": params}}]))
        servers, state, _ = await _serve(tmp_path, FakeClaims(*claims))
        try:
            async with grpc.aio.insecure_channel(f"unix://{servers.dra_socket}") as ch:
                resp = await v1_grpc.DRAPluginStub(ch).NodePrepareResources(v1.NodePrepareResourcesRequest(claims=[
                    v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                    for c in claims]))
        finally:
            await servers.stop()
        assert len(resp.claims) == 100 and resp.ByteSize() < MAX_RESPONSE_BYTES
        for i, c in enumerate(claims):
            err = resp.claims[c["metadata"]["uid"]].error
            assert 0 < len(err.encode()) <= MAX_MESSAGE, len(err)
            assert err.startswith(f"claim default/c{i} status.allocation.devices.config[0].opaque.parameters"), err
        assert state.prepared_claims() == {}

    asyncio.run(scenario())


def test_errors_are_shortened_until_the_whole_response_fits(tmp_path) -> None:
    """5,000 claims with 1 KiB errors each would make a 5 MB answer: each error is cut shorter instead."""
    from driver.plugin.server import bound_errors

    resp = v1.NodePrepareResourcesResponse()
    errors = {f"uid-{i:05d}": f"claim default/c{i}: " + "why " * 1000 for i in range(5000)}
    bound_errors(resp, errors)
    assert resp.ByteSize() <= MAX_RESPONSE_BYTES and len(resp.claims) == 5000
    assert all(e.error.startswith("claim default/c") and "why why" in e.error for e in resp.claims.values())
    json.dumps({k: v.error for k, v in resp.claims.items()})       # valid text, no split characters


def test_explain_refuses_a_hostile_claim_name_without_a_request() -> None:
    import argparse

    from controller.allocator.explain import ExplainInputError
    from controller.explain_cmd import _from_cluster

    async def scenario():
        async with RecordingApi() as api:
            args = argparse.Namespace(kube_api=api.url, kubeconfig=None, context=None, namespace=None)
            for claim in ("default/x?watch=true", "../../api/v1/nodes/node-a", "a/b/c"):
                with pytest.raises(ExplainInputError, match=r"^--claim .*: ResourceClaim (name|namespace) .* is not a valid "
                                                            r"Kubernetes name.*; give it as NAME \(with -n NAMESPACE\) or "
                                                            r"NAMESPACE/NAME"):
                    await asyncio.wait_for(_from_cluster(args, claim), timeout=10)
        return api.requests

    assert asyncio.run(scenario()) == []


def test_the_plugin_refuses_an_invalid_node_name_at_start(capsys) -> None:
    import argparse

    from driver.plugin.main import add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert run(p.parse_args(["--node-name", "../nodes/x"])) == 2
    assert "--node-name (NODE_NAME) '../nodes/x' is not a valid Kubernetes name" in capsys.readouterr().err
