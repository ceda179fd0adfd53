"""The sandbox's API emulator decodes, defaults and validates writes as the real API server does."""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest

from controller.sandbox.apiserver import ApiError, ApiServer
from tests.test_cel import SEVEN_DEEP


@pytest.fixture(scope="module")
def server():
    s = ApiServer(bookmark_interval=5.0)
    s.start_in_thread()
    yield s
    s.stop_in_thread()


def post(server: ApiServer, path: str, body: dict, strict: bool = False) -> tuple[int, dict]:
    url = server.url + path + ("?fieldValidation=Strict" if strict else "")
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req) as r:       # noqa: S310 - the local emulator
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


CLAIMS = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"


def claim(name: str, *requests: dict, **devices) -> dict:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": name},
            "spec": {"devices": {"requests": list(requests), **devices}}}


def exact(name: str = "gpu", **fields) -> dict:
    return {"name": name, "exactly": {"deviceClassName": "gpu.partita.dev", **fields}}


def causes(status: dict) -> list[tuple[str, str]]:
    return [(c["field"], c["reason"]) for c in status["details"]["causes"]]


# -- decoding ---------------------------------------------------------------------------------------
def test_a_misspelled_field_is_a_strict_decoding_error_or_dropped_then_required(server) -> None:
    bad = claim("typo", {"name": "gpu", "exactly": {"deviceClass": "gpu.partita.dev"}})
    code, status = post(server, CLAIMS, bad, strict=True)          # what kubectl sends
    assert (code, status["reason"]) == (400, "BadRequest")
    assert 'strict decoding error: unknown field "spec.devices.requests[0].exactly.deviceClass"' in status["message"]
    assert causes(status) == [("spec.devices.requests[0].exactly.deviceClass", "FieldValueInvalid")]
    code, status = post(server, CLAIMS, bad)                       # the server's default: Warn (dropped)
    assert (code, status["reason"], status["code"]) == (422, "Invalid", 422)
    assert status["message"] == ('ResourceClaim.resource.k8s.io "typo" is invalid: '
                                 "spec.devices.requests[0].exactly.deviceClassName: Required value")
    assert status["details"]["name"] == "typo" and status["details"]["kind"] == "ResourceClaim"
    assert causes(status) == [("spec.devices.requests[0].exactly.deviceClassName", "FieldValueRequired")]
    assert server.get("resourceclaims", "typo", "default") is None


def test_unknown_fields_are_dropped_under_warn_and_wrong_types_refused(server) -> None:
    c = claim("extra", exact())
    c["spec"]["devices"]["requests"][0]["exactly"]["colour"] = "blue"
    c["spec"]["nonsense"] = 1
    code, stored = post(server, CLAIMS, c)
    assert code == 201 and "nonsense" not in stored["spec"]
    assert "colour" not in stored["spec"]["devices"]["requests"][0]["exactly"]
    code, status = post(server, CLAIMS, claim("wrongtype", exact(count="two")))
    assert code == 400 and "spec.devices.requests[0].exactly.count: expected int" in status["message"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "busybox", "imagee": "x"}]}}
    code, status = post(server, "/api/v1/namespaces/default/pods", pod, strict=True)
    assert code == 400 and 'unknown field "spec.containers[0].imagee"' in status["message"]


# -- defaulting -------------------------------------------------------------------------------------
def test_defaults_as_the_real_server_applies_them(server) -> None:
    c = claim("defaults", exact("one", tolerations=[{"key": "k", "value": "v", "effect": "NoSchedule"}]),
              exact("all", allocationMode="All"),
              {"name": "either", "firstAvailable": [{"name": "big", "deviceClassName": "gpu.partita.dev"},
                                                    {"name": "small", "deviceClassName": "mig.partita.dev", "count": 2}]})
    code, stored = post(server, CLAIMS, c)
    assert code == 201, stored
    one, all_, either = stored["spec"]["devices"]["requests"]
    assert (one["exactly"]["allocationMode"], one["exactly"]["count"]) == ("ExactCount", 1)
    assert one["exactly"]["tolerations"][0]["operator"] == "Equal"
    assert all_["exactly"]["allocationMode"] == "All" and "count" not in all_["exactly"]
    assert [(s["allocationMode"], s["count"]) for s in either["firstAvailable"]] == [("ExactCount", 1), ("ExactCount", 2)]
    # the Python store API admits the same way
    direct = server.create(claim("direct", exact()))
    assert direct["spec"]["devices"]["requests"][0]["exactly"]["count"] == 1


# -- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("obj, field, reason, text", [
    (claim("Bad_Name", exact()), "metadata.name", "FieldValueInvalid", "RFC 1123 subdomain"),
    (claim("c", exact("GPU")), "spec.devices.requests[0].name", "FieldValueInvalid", "RFC 1123 label"),
    (claim("c", exact(), exact()), "spec.devices.requests[1].name", "FieldValueDuplicate", "Duplicate value"),
    (claim("c", {"name": "gpu"}), "spec.devices.requests[0]", "FieldValueRequired",
     "exactly one of `exactly` or `firstAvailable` is required"),
    (claim("c", exact(count=-1)), "spec.devices.requests[0].exactly.count", "FieldValueInvalid",
     "must be greater than zero"),
    (claim("c", exact(allocationMode="Some")), "spec.devices.requests[0].exactly.allocationMode",
     "FieldValueNotSupported", 'supported values: "All", "ExactCount"'),
    (claim("c", exact(allocationMode="All", count=2)), "spec.devices.requests[0].exactly.count", "FieldValueInvalid",
     "must not be specified when allocationMode is 'All'"),
    (claim("c", exact(deviceClassName="GPU Class")), "spec.devices.requests[0].exactly.deviceClassName",
     "FieldValueInvalid", "RFC 1123 subdomain"),
    (claim("c", exact(selectors=[{"cel": {"expression": "device.attributes[ =="}}])),
     "spec.devices.requests[0].exactly.selectors[0].cel.expression", "FieldValueInvalid", "compilation failed"),
    (claim("c", exact(selectors=[{"cel": {"expression": "nosuch(device)"}}])),
     "spec.devices.requests[0].exactly.selectors[0].cel.expression", "FieldValueInvalid",
     "undeclared reference to 'nosuch'"),
    (claim("c", exact(selectors=[{"cel": {"expression": SEVEN_DEEP}}])),
     "spec.devices.requests[0].exactly.selectors[0].cel.expression", "FieldValueForbidden",
     "too complex, exceeds cost limit"),
    (claim("c", exact(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}])),
     "spec.devices.requests[0].exactly.tolerations[0].value", "FieldValueInvalid", "must be empty when `operator` is 'Exists'"),
    (claim("c", exact(), constraints=[{"requests": ["nope"], "matchAttribute": "gpu.partita.dev/numaNode"}]),
     "spec.devices.constraints[0].requests[0]", "FieldValueInvalid", "must be the name of a request"),
    (claim("c", exact(), constraints=[{"matchAttribute": "numaNode"}]),
     "spec.devices.constraints[0].matchAttribute", "FieldValueInvalid", "fully qualified name"),
])
def test_claims_are_validated_at_create(server, obj, field, reason, text) -> None:
    code, status = post(server, CLAIMS, obj)
    assert (code, status["reason"]) == (422, "Invalid"), status
    assert (field, reason) in causes(status)
    assert text in status["message"] and field in status["message"]


def test_selectors_of_templates_and_classes_compile_at_create_and_optionals_are_accepted(server) -> None:
    bad = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate", "metadata": {"name": "t"},
           "spec": {"spec": {"devices": {"requests": [exact(selectors=[{"cel": {"expression": "device.x("}}])]}}}}
    code, status = post(server, "/apis/resource.k8s.io/v1/namespaces/default/resourceclaimtemplates", bad)
    assert code == 422 and causes(status) == [("spec.spec.devices.requests[0].exactly.selectors[0].cel.expression",
                                                "FieldValueInvalid")]
    cls = {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": "bad.example.com"},
           "spec": {"selectors": [{"cel": {"expression": "device.driver = 'x'"}}]}}
    code, status = post(server, "/apis/resource.k8s.io/v1/deviceclasses", cls)
    assert code == 422 and causes(status) == [("spec.selectors[0].cel.expression", "FieldValueInvalid")]
    ok = claim("optional", exact(selectors=[{"cel": {"expression":
                                                     "device.attributes['gpu.partita.dev'].?rack.orValue('') == 'r1'"}}]))
    assert post(server, CLAIMS, ok)[0] == 201


def test_slices_are_validated(server) -> None:
    s = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": "s"},
         "spec": {"driver": "gpu.partita.dev", "nodeName": "n", "allNodes": True,
                  "pool": {"name": "n", "generation": 1, "resourceSliceCount": 1},
                  "devices": [{"name": "gpu-0"}, {"name": "gpu-0"}]}}
    code, status = post(server, "/apis/resource.k8s.io/v1/resourceslices", s)
    assert code == 422
    assert ("spec", "FieldValueRequired") in causes(status) and "multiple fields are set" in status["message"]
    assert ("spec.devices[1].name", "FieldValueDuplicate") in causes(status)


def test_a_pods_claim_references_are_validated(server) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": "busybox", "resources": {"claims": [{"name": "gpus"}]}}],
                    "resourceClaims": [{"name": "gpu", "resourceClaimName": "c", "resourceClaimTemplateName": "t"}]}}
    code, status = post(server, "/api/v1/namespaces/default/pods", pod)
    assert code == 422
    assert causes(status) == [("spec.resourceClaims[0]", "FieldValueInvalid"),
                              ("spec.containers[0].resources.claims[0].name", "FieldValueNotFound")]
    assert 'spec.containers[0].resources.claims[0].name: Not found: "gpus"' in status["message"]


def test_claim_spec_is_immutable(server) -> None:
    stored = server.create(claim("frozen", exact()))
    changed = copy.deepcopy(stored)
    changed["spec"]["devices"]["requests"][0]["exactly"]["count"] = 2
    with pytest.raises(ApiError) as err:
        server.update(changed)
    assert err.value.code == 422 and "spec: Invalid value" in err.value.message and "field is immutable" in err.value.message
    stored["metadata"]["labels"] = {"a": "b"}          # metadata stays writable
    assert server.update(stored)["metadata"]["labels"] == {"a": "b"}


# -- the decoding schema is the API's ----------------------------------------------------------------
def test_the_decoding_schema_matches_kubernetes_validate_for_the_resource_kinds() -> None:
    """The emulator decodes with the official client's models (a runtime dependency); for every
    resource.k8s.io/v1 kind it serves, each object's field names must be the 1.37 OpenAPI schema's."""
    from pathlib import Path

    import kubernetes_validate

    from controller.sandbox.validation import MODELS, _model

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / "v1.37.0-local-strict"
    defs = json.loads((root / "_definitions.json").read_text())["$defs"]

    def resolve(schema: dict) -> dict:
        while "$ref" in schema:
            schema = defs[schema["$ref"].rsplit("/", 1)[1]]
        for sub in schema.get("allOf") or []:
            if "$ref" in sub:
                return resolve(sub)
        return schema

    checked = set()

    def compare(schema: dict, model: type, path: str) -> None:
        schema = resolve(schema)
        if model.__name__ in checked:
            return
        checked.add(model.__name__)
        props = schema.get("properties") or {}
        assert set(props) == set(model.attribute_map.values()), path
        for py, js in model.attribute_map.items():
            type_name = model.openapi_types[py]
            inner = type_name.split("[")[-1].rstrip("]").split(", ")[-1]
            sub = _model(inner)
            if sub is None:
                continue
            s = resolve(props[js])
            types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
            if "array" in types:
                s = s["items"]
            elif "object" in types and isinstance(s.get("additionalProperties"), dict) and "properties" not in s:
                s = s["additionalProperties"]
            compare(s, sub, f"{path}.{js}")

    for (api, kind), model in MODELS.items():
        if api == "resource.k8s.io/v1":
            top = json.loads((root / f"{kind.lower()}-resource-v1.json").read_text())
            compare(top, model, kind)
    assert {"V1ExactDeviceRequest", "V1DeviceSelector", "V1Device", "V1DeviceClassSpec"} <= checked


def _too_many_cases() -> list:
    tol = {"key": "k", "operator": "Exists", "effect": "NoSchedule"}
    sub = {"name": "s", "deviceClassName": "gpu.partita.dev"}
    match = {"matchAttribute": "gpu.partita.dev/productName"}
    opaque = {"opaque": {"driver": "gpu.partita.dev", "parameters": {}}}
    return [
        (claim("reqs", *(exact(f"r{i}") for i in range(33))), "spec.devices.requests", 33, 32),
        (claim("subs", {"name": "gpu", "firstAvailable": [{**sub, "name": f"s{i}"} for i in range(9)]}),
         "spec.devices.requests[0].firstAvailable", 9, 8),
        (claim("tols", exact(tolerations=[tol] * 17)), "spec.devices.requests[0].exactly.tolerations", 17, 16),
        (claim("cons", exact(), constraints=[match] * 33), "spec.devices.constraints", 33, 32),
        (claim("conf", exact(), config=[opaque] * 33), "spec.devices.config", 33, 32),
    ]


@pytest.mark.parametrize("obj, field, n, limit", _too_many_cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_a_list_over_its_limit_is_refused_and_its_entries_are_still_checked(server, obj, field, n, limit) -> None:
    obj = copy.deepcopy(obj)
    code, status = post(server, CLAIMS, obj)
    assert code == 422, status
    assert (field, "FieldValueTooMany") in causes(status)
    assert f"{field}: Too many: {n}: must have at most {limit} items" in status["message"]
    # an entry of the long list is validated at its own path too
    entries = _at(obj, field)
    last = entries[-1]
    if "name" in last:
        last["name"] = "Bad_Name"
        bad = f"{field}[{n - 1}].name"
    elif "opaque" in last:
        last["opaque"] = {"driver": "gpu.partita.dev"}
        bad = f"{field}[{n - 1}].opaque.parameters"
    elif "matchAttribute" in last:
        last["matchAttribute"] = "noslash"
        bad = f"{field}[{n - 1}].matchAttribute"
    else:
        last["operator"] = "Sometimes"
        bad = f"{field}[{n - 1}].operator"
    code, status = post(server, CLAIMS, obj)
    assert code == 422 and bad in [f for f, _ in causes(status)], status


def _at(obj: dict, field: str):  # noqa: ANN202 - the list at a field path such as a.b[0].c
    node = obj
    for part in field.split("."):
        name, _, index = part.partition("[")
        node = node[name]
        if index:
            node = node[int(index.rstrip("]"))]
    return node


def test_a_slice_with_too_many_devices_is_refused_and_a_device_attribute_error_names_its_device(server) -> None:
    devices = [{"name": f"gpu-{i}"} for i in range(129)]
    devices[128]["attributes"] = {"model": {"string": "x", "int": 1}}
    s = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": "many"},
         "spec": {"driver": "gpu.partita.dev", "nodeName": "n",
                  "pool": {"name": "n", "generation": 1, "resourceSliceCount": 1}, "devices": devices}}
    code, status = post(server, "/apis/resource.k8s.io/v1/resourceslices", s)
    assert code == 422
    assert ("spec.devices", "FieldValueTooMany") in causes(status)
    assert ("spec.devices[128].attributes[model]", "FieldValueInvalid") in causes(status)
