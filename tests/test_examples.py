"""The workload manifests users apply (examples/) are valid Kubernetes objects for 1.34-1.37."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from driver.api.deviceclasses import device_classes

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
VERSIONS = ["1.34.0", "1.35.0", "1.36.0", "1.37.0"]
SHIPPED_CLASSES = {c["metadata"]["name"] for c in device_classes()}
WORKLOADS = ("Deployment", "StatefulSet", "Job")       # kinds with a pod template


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("version", VERSIONS)
def test_example_validates_against_kubernetes_schema(path: Path, version: str) -> None:
    for doc in _docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


def _requests(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "ResourceClaimTemplate":
        spec = spec.get("spec", {})
    out = []
    for r in spec.get("devices", {}).get("requests", []):
        out.extend([r["exactly"]] if "exactly" in r else r.get("firstAvailable", []))
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_uses_shipped_device_classes_and_pods_reference_their_claims(path: Path) -> None:
    docs = _docs(path)
    templates = {d["metadata"]["name"] for d in docs if d["kind"] == "ResourceClaimTemplate"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "ResourceClaim"}
    for doc in docs:
        if doc["kind"] in ("ResourceClaimTemplate", "ResourceClaim"):
            for req in _requests(doc):
                assert req["deviceClassName"] in SHIPPED_CLASSES, (path.name, req)
        if doc["kind"] in ("Pod", *WORKLOADS):
            pod_spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
            pod_claims = {c["name"]: c for c in pod_spec.get("resourceClaims", [])}
            assert pod_claims, f"{path.name}: {doc['kind']} {doc['metadata']['name']} uses no claim"
            for c in pod_claims.values():
                ref = c.get("resourceClaimTemplateName") or c.get("resourceClaimName")
                assert ref in templates | claims, f"{path.name}: pod claim {c['name']} refers to {ref}"
            if doc["kind"] in WORKLOADS:
                # a workload's pods cannot share one ResourceClaim by accident: templates only
                assert all("resourceClaimTemplateName" in c for c in pod_claims.values()), path.name
            for container in pod_spec["containers"]:
                for used in container.get("resources", {}).get("claims", []):
                    assert used["name"] in pod_claims, f"{path.name}: container uses unknown claim {used}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_gpu_configs_are_valid(path: Path) -> None:
    from driver.api.config import validate_claim_configs

    for doc in _docs(path):
        if doc["kind"] in ("ResourceClaimTemplate", "ResourceClaim"):
            spec = doc["spec"]["spec"] if doc["kind"] == "ResourceClaimTemplate" else doc["spec"]
            assert validate_claim_configs(spec, "gpu.partita.dev", f"{path.name} {doc['metadata']['name']}") == []


def test_the_examples_cover_every_device_type() -> None:
    used = {req["deviceClassName"] for path in EXAMPLES for doc in _docs(path)
            if doc["kind"] in ("ResourceClaimTemplate", "ResourceClaim") for req in _requests(doc)}
    assert used == SHIPPED_CLASSES


def test_the_examples_cover_every_workload_kind_the_sandbox_runs() -> None:
    kinds = {doc["kind"] for path in EXAMPLES for doc in _docs(path)}
    assert {"Pod", *WORKLOADS} <= kinds


def test_every_example_is_in_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [p.name for p in EXAMPLES if f"| `{p.name}` |" not in readme] == []


ADMIN_LABEL = "resource.kubernetes.io/admin-access"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_admin_access_claims_live_in_a_namespace_labelled_for_it(path: Path) -> None:
    """The API server refuses adminAccess outside namespaces labelled resource.kubernetes.io/admin-access:
    "true" (KEP-5018), so an example asking for it brings such a namespace."""
    docs = _docs(path)
    labelled = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"
                and (d["metadata"].get("labels") or {}).get(ADMIN_LABEL) == "true"}
    for doc in docs:
        if doc["kind"] in ("ResourceClaimTemplate", "ResourceClaim") and any(r.get("adminAccess")
                                                                             for r in _requests(doc)):
            ns = doc["metadata"].get("namespace", "default")
            assert ns in labelled, f"{path.name}: {doc['kind']} {doc['metadata']['name']} asks adminAccess in {ns}"


def test_an_example_shows_admin_access() -> None:
    assert any(r.get("adminAccess") for path in EXAMPLES for doc in _docs(path)
               if doc["kind"] in ("ResourceClaimTemplate", "ResourceClaim") for r in _requests(doc))
