"""Workload manifests for the sandbox: load multi-document YAML files and create their objects.

The API emulator serves the objects DRA involves (see :data:`apiserver.RESOURCES`). An ``apps/v1``
Deployment is expanded here into its pods, ``<name>-0`` .. ``<name>-<replicas-1>``, standing in for the
Deployment and ReplicaSet controllers (no rollout, no re-creation of deleted pods).

Every object is admitted as ``kubectl apply`` would get it admitted (``fieldValidation=Strict``,
:mod:`controller.sandbox.validation`) when it is loaded, before the cluster starts: a misspelled field,
a missing required one or a selector that does not compile is a :class:`ManifestError` naming the file,
the document, the object and the field (``partita sandbox`` exits 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from . import validation
from .apiserver import RESOURCES, ApiError, ApiServer

#: where the examples live in a source checkout (the README's commands run from one)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class ManifestError(ValueError):
    """A manifest the sandbox cannot apply; the message names the file, the document and the fix."""


@dataclass(frozen=True)
class Manifest:
    source: str
    index: int
    obj: dict

    @property
    def where(self) -> str:
        md = self.obj.get("metadata") or {}
        return f"{self.source} document {self.index + 1} ({self.obj.get('kind')} {md.get('name', '?')})"


_KINDS = {(r.api_version, r.kind): r for r in RESOURCES}


def default_files() -> list[Path]:
    if not EXAMPLES.is_dir():
        raise ManifestError(f"the examples directory {EXAMPLES} is missing (the sandbox runs from a source "
                            "checkout); pass manifest files with --manifests FILE")
    return sorted(EXAMPLES.glob("*.yaml"))


def load(paths: list[Path]) -> list[Manifest]:
    out: list[Manifest] = []
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(Path(path).read_text()))
        except OSError as e:
            raise ManifestError(f"cannot read manifest {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ManifestError(f"manifest {path} is not valid YAML: {e}") from None
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
                raise ManifestError(f"{path} document {i + 1}: expected a Kubernetes object with apiVersion and kind")
            m = Manifest(str(path), i, doc)
            if (doc["apiVersion"], doc["kind"]) == ("apps/v1", "Deployment"):
                out.extend(_deployment_pods(m))
                continue
            if (doc["apiVersion"], doc["kind"]) not in _KINDS:
                known = ", ".join(sorted([f"{k} ({v})" for v, k in _KINDS] + ["Deployment (apps/v1, as pods)"]))
                raise ManifestError(f"{m.where}: the sandbox does not serve {doc['apiVersion']} {doc['kind']}; "
                                    f"it serves {known}")
            if not (doc.get("metadata") or {}).get("name"):
                raise ManifestError(f"{m.where}: metadata.name is required")
            if doc["kind"] == "Pod" and not (doc.get("spec") or {}).get("containers"):
                raise ManifestError(f"{m.where}: spec.containers is required")
            admit(m)
            out.append(m)
    return out


def rejection(m: Manifest, code: int, reason: str, message: str, fields: list[str]) -> ManifestError:
    named = ", ".join(dict.fromkeys(fields))
    return ManifestError(f"{m.where}: the API server refuses it ({code} {reason}"
                         f"{', field ' + named if named else ''}): {message}")


def admit(m: Manifest) -> None:
    """Decode and validate ``m`` as the API server does for ``kubectl apply`` (Strict field validation)."""
    try:
        validation.admit(m.obj, None, "Strict")
    except validation.Rejected as e:
        raise rejection(m, e.code, e.reason, e.message, [err.field for err in e.errors]) from None


def _deployment_pods(m: Manifest) -> list[Manifest]:
    md = m.obj.get("metadata") or {}
    if not md.get("name"):
        raise ManifestError(f"{m.where}: metadata.name is required")
    admit(m)
    spec = m.obj.get("spec") or {}
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 1000:
        raise ManifestError(f"{m.where}: spec.replicas must be an integer from 0 to 1000, got {replicas!r}")
    template = spec.get("template") or {}
    if not (template.get("spec") or {}).get("containers"):
        raise ManifestError(f"{m.where}: spec.template.spec.containers is required")
    pods = []
    for i in range(replicas):
        tmd = template.get("metadata") or {}
        pod_md = {"name": f"{md['name']}-{i}", "labels": dict(tmd.get("labels") or {})}
        if md.get("namespace"):
            pod_md["namespace"] = md["namespace"]
        pods.append(Manifest(m.source, m.index, {"apiVersion": "v1", "kind": "Pod", "metadata": pod_md,
                                                 "spec": template["spec"]}))
    return pods


def apply(server: ApiServer, manifests: list[Manifest]) -> list[dict]:
    """Create every object (namespaces first, pods last, as kubectl apply -f on a directory would end
    up); namespaces that do not exist are created."""
    order = {"Namespace": 0, "DeviceClass": 1, "ResourceClaimTemplate": 2, "ResourceClaim": 3, "Pod": 9}
    created = []
    for m in sorted(manifests, key=lambda m: order.get(m.obj["kind"], 5)):
        res = _KINDS[(m.obj["apiVersion"], m.obj["kind"])]
        obj = dict(m.obj)
        if res.namespaced:
            ns = (obj.get("metadata") or {}).get("namespace") or "default"
            obj["metadata"] = {**obj["metadata"], "namespace": ns}
            if server.get("namespaces", ns) is None:
                server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        try:
            created.append(server.create(obj, keep_status=False, field_validation="Strict"))
        except ApiError as e:
            fields = [c.get("field", "") for c in (e.details or {}).get("causes") or []]
            raise rejection(m, e.code, e.reason, e.message, fields) from None
    return created
