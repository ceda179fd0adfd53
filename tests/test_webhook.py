"""``partita webhook``: AdmissionReview answers for GpuConfig in claims, templates and classes."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestClient, TestServer

from controller.webhook import make_app, review

DRIVER = "gpu.partita.dev"


def _config(parameters: dict) -> list[dict]:
    return [{"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": parameters}}]


def _request(obj: dict, uid: str = "u-1") -> dict:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": uid, "kind": {"group": "resource.k8s.io", "version": "v1", "kind": obj["kind"]},
                        "operation": "CREATE", "object": obj}}


GOOD = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": {"strategy": "MPS"}}
BAD = {"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
       "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}}}


def test_templates_claims_and_classes_with_bad_gpu_config_are_denied_naming_the_field() -> None:
    template = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
                "metadata": {"name": "nb", "namespace": "team-a"},
                "spec": {"spec": {"devices": {"requests": [], "config": _config(BAD)}}}}
    out = review(_request(template), DRIVER)["response"]
    assert out["allowed"] is False and out["uid"] == "u-1"
    msg = out["status"]["message"]
    assert "ResourceClaimTemplate team-a/nb" in msg and "timeSlicingConfig.interval" in msg and "Medium" in msg
    claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "c", "namespace": "d"},
             "spec": {"devices": {"requests": [], "config": _config({**GOOD, "kind": "Nope"})}}}
    assert "kind" in review(_request(claim), DRIVER)["response"]["status"]["message"]
    cls = {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": "x"},
           "spec": {"config": [{"opaque": {"driver": DRIVER, "parameters": BAD}}]}}
    assert review(_request(cls), DRIVER)["response"]["allowed"] is False


def test_valid_configs_and_other_drivers_configs_are_allowed() -> None:
    claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "c", "namespace": "d"},
             "spec": {"devices": {"requests": [], "config": _config(GOOD) + [
                 {"opaque": {"driver": "other.example.com", "parameters": {"anything": True}}}]}}}
    assert review(_request(claim), DRIVER)["response"] == {"uid": "u-1", "allowed": True}


def test_served_over_http() -> None:
    async def main():
        async with TestClient(TestServer(make_app(DRIVER))) as client:
            claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": "c"},
                     "spec": {"devices": {"requests": [], "config": _config(BAD)}}}
            r = await client.post("/validate", json=_request(claim, "abc"))
            body = await r.json()
            assert r.status == 200 and body["kind"] == "AdmissionReview"
            assert body["response"]["uid"] == "abc" and body["response"]["allowed"] is False
            assert (await client.post("/validate", data=b"not json")).status == 400
            assert (await client.get("/healthz")).status == 200
    asyncio.run(main())
