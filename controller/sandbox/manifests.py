"""Workload manifests for the sandbox: load multi-document YAML files and create their objects.

The API emulator serves the objects DRA involves (see :data:`apiserver.RESOURCES`). Workload controllers
are stood in for here and in :mod:`controller.sandbox.jobs`:

* ``apps/v1`` **Deployment**: its pods, ``<name>-0`` .. ``<name>-<replicas-1>`` (the Deployment and
  ReplicaSet controllers; no rollout, no re-creation of deleted pods).
* ``apps/v1`` **StatefulSet**: its pods with their ordinals, ``<name>-0`` .. ``<name>-<replicas-1>``, labelled
  ``statefulset.kubernetes.io/pod-name`` and ``apps.kubernetes.io/pod-index`` as upstream's controller labels
  them, created together (as ``podManagementPolicy: Parallel``); ``volumeClaimTemplates`` are ignored (the
  sandbox has no storage) with a note.
* ``batch/v1`` **Job**: kept as a :class:`Manifest`; the Job stand-in (:class:`jobs.JobController`)
  creates its pods ``parallelism`` at a time until ``completions`` succeeded.

Each pod's ResourceClaimTemplates become claims per pod, as for any pod (the claim controller stand-in).

Every object is admitted as ``kubectl apply`` would get it admitted (``fieldValidation=Strict``,
:mod:`controller.sandbox.validation`) when it is loaded, before the cluster starts: a misspelled field,
a missing required one or a selector that does not compile is a :class:`ManifestError` naming the file,
the document, the object and the field (``partita sandbox`` exits 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from driver.errors import PartitaError

from . import validation
from .apiserver import RESOURCES, ApiError, ApiServer

#: the annotation naming the workload a pod was created for (``Deployment/notebooks``)
CREATED_BY = "sandbox.partita.dev/created-by"
STATEFULSET_POD_NAME = "statefulset.kubernetes.io/pod-name"
POD_INDEX = "apps.kubernetes.io/pod-index"

#: where the examples live in a source checkout (the README's commands run from one)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class ManifestError(PartitaError, ValueError):
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


def load(paths: list[Path], notes: list[str] | None = None) -> list[Manifest]:
    """The objects of ``paths``, workloads expanded (Jobs kept for their stand-in); what the sandbox
    ignores of them is appended to ``notes``."""
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
            workload = WORKLOADS.get((doc["apiVersion"], doc["kind"]))
            if workload is not None:
                out.extend(workload(m, notes if notes is not None else []))
                continue
            if (doc["apiVersion"], doc["kind"]) not in _KINDS:
                known = ", ".join(sorted([f"{k} ({v})" for v, k in _KINDS] + [
                    f"{k} ({v}, {how})" for (v, k), how in WORKLOAD_HOW.items()]))
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


def _replicas(m: Manifest, field: str, value: object, default: int) -> int:
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
        raise ManifestError(f"{m.where}: {field} must be an integer from 0 to 1000, got {value!r}")
    return value


def _template(m: Manifest) -> dict:
    md = m.obj.get("metadata") or {}
    if not md.get("name"):
        raise ManifestError(f"{m.where}: metadata.name is required")
    admit(m)
    template = (m.obj.get("spec") or {}).get("template") or {}
    if not (template.get("spec") or {}).get("containers"):
        raise ManifestError(f"{m.where}: spec.template.spec.containers is required")
    return template


def pod_of(m: Manifest, name: str, labels: dict[str, str] | None = None) -> Manifest:
    """A pod of workload ``m`` from its template, named ``name``, with ``labels`` added."""
    md = m.obj.get("metadata") or {}
    template = (m.obj.get("spec") or {}).get("template") or {}
    tmd = template.get("metadata") or {}
    pod_md: dict = {"name": name, "labels": {**(tmd.get("labels") or {}), **(labels or {})},
                    "annotations": {**(tmd.get("annotations") or {}), CREATED_BY: f"{m.obj['kind']}/{md['name']}"}}
    if md.get("namespace"):
        pod_md["namespace"] = md["namespace"]
    return Manifest(m.source, m.index, {"apiVersion": "v1", "kind": "Pod", "metadata": pod_md,
                                        "spec": copy.deepcopy(template["spec"])})


def _deployment_pods(m: Manifest, notes: list[str]) -> list[Manifest]:
    _template(m)
    replicas = _replicas(m, "spec.replicas", (m.obj.get("spec") or {}).get("replicas"), 1)
    return [pod_of(m, f"{m.obj['metadata']['name']}-{i}") for i in range(replicas)]


def _statefulset_pods(m: Manifest, notes: list[str]) -> list[Manifest]:
    _template(m)
    spec = m.obj.get("spec") or {}
    replicas = _replicas(m, "spec.replicas", spec.get("replicas"), 1)
    name = m.obj["metadata"]["name"]
    volumes = [(v.get("metadata") or {}).get("name", "?") for v in spec.get("volumeClaimTemplates") or []]
    if volumes:
        notes.append(f"{m.where}: volumeClaimTemplates ({', '.join(volumes)}) ignored: the sandbox has no storage; "
                     "the pods run without those volumes' claims")
    return [pod_of(m, f"{name}-{i}", {STATEFULSET_POD_NAME: f"{name}-{i}", POD_INDEX: str(i)})
            for i in range(replicas)]


def _job(m: Manifest, notes: list[str]) -> list[Manifest]:
    template = _template(m)
    spec = m.obj.get("spec") or {}
    parallelism = _replicas(m, "spec.parallelism", spec.get("parallelism"), 1)
    _replicas(m, "spec.completions", spec.get("completions"), parallelism)
    policy = (template.get("spec") or {}).get("restartPolicy")
    if policy not in ("Never", "OnFailure"):
        raise ManifestError(f"{m.where}: spec.template.spec.restartPolicy must be Never or OnFailure for a Job, got "
                            f"{policy!r} (the API server refuses it: 422 Invalid)")
    return [m]


WORKLOADS: dict[tuple[str, str], Callable[[Manifest, list[str]], list[Manifest]]] = {
    ("apps/v1", "Deployment"): _deployment_pods,
    ("apps/v1", "StatefulSet"): _statefulset_pods,
    ("batch/v1", "Job"): _job,
}
WORKLOAD_HOW = {("apps/v1", "Deployment"): "as pods", ("apps/v1", "StatefulSet"): "as pods",
                ("batch/v1", "Job"): "by a Job stand-in"}


def apply(server: ApiServer, manifests: list[Manifest]) -> list[dict]:
    """Create every object (namespaces first, pods last, as kubectl apply -f on a directory would end
    up); namespaces that do not exist are created."""
    order = {"Namespace": 0, "DeviceClass": 1, "ResourceClaimTemplate": 2, "ResourceClaim": 3, "Pod": 9}
    created = []
    for m in sorted(manifests, key=lambda m: order.get(m.obj["kind"], 5)):
        if (m.obj["apiVersion"], m.obj["kind"]) in WORKLOADS:
            continue          # a Job: its stand-in creates the pods
        res = _KINDS[(m.obj["apiVersion"], m.obj["kind"])]
        obj = dict(m.obj)
        if res.namespaced:
            ns = (obj.get("metadata") or {}).get("namespace") or "default"
            obj["metadata"] = {**obj["metadata"], "namespace": ns}
            ensure_namespace(server, ns)
        try:
            created.append(server.create(obj, keep_status=False, field_validation="Strict"))
        except ApiError as e:
            fields = [c.get("field", "") for c in (e.details or {}).get("causes") or []]
            raise rejection(m, e.code, e.reason, e.message, fields) from None
    for m in jobs(manifests):
        ensure_namespace(server, (m.obj.get("metadata") or {}).get("namespace") or "default")
    return created


def ensure_namespace(server: ApiServer, ns: str) -> None:
    if server.get("namespaces", ns) is None:
        server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})


def jobs(manifests: list[Manifest]) -> list[Manifest]:
    """The Jobs among ``manifests``, for the Job stand-in."""
    return [m for m in manifests if (m.obj["apiVersion"], m.obj["kind"]) == ("batch/v1", "Job")]
