"""Gangs: pods whose claims are allocated all together or not at all (docs/gangs.md).

A pod belongs to a gang by

* the Workload API (Kubernetes 1.35, ``scheduling.k8s.io/v1alpha1``, GenericWorkload feature gate):
  ``spec.workloadRef`` names a Workload and one of its ``spec.podGroups``; a group with a ``gang`` policy
  is a gang of ``minCount`` pods (``podGroupReplicaKey`` splits it into independent gangs). A cluster that
  does not serve the API drops ``spec.workloadRef`` from pods, so its presence is the feature detection;
* or, anywhere, the annotations ``partita.dev/gang: NAME`` and ``partita.dev/gang-size: N`` (N pods of the
  namespace with the same NAME); on a Job's pods (label ``batch.kubernetes.io/job-name``) NAME may be left
  out: the Job is the gang.

``partita.dev/gang-topology: node`` requires every member on one node; without it the controller prefers
one node and spreads only when no node holds the whole gang. Within one claim, NVLink domain or NUMA node
is the DRA way: a ``matchAttribute`` constraint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .claims import is_pending, key
from driver.errors import PartitaError

GANG = "partita.dev/gang"
GANG_SIZE = "partita.dev/gang-size"
GANG_TOPOLOGY = "partita.dev/gang-topology"
JOB_NAME = "batch.kubernetes.io/job-name"
TOPOLOGIES = ("node",)
WORKLOAD_API = "/apis/scheduling.k8s.io/v1alpha1"
MAX_GANG = 1024


class GangError(PartitaError, ValueError):
    """A pod's gang annotations or Workload reference cannot be used (the message says which and the fix)."""


@dataclass(frozen=True)
class GangRef:
    namespace: str
    name: str                    # "NAME", "job/JOB" or "workload/WORKLOAD/GROUP[/REPLICA]"
    size: int | None             # None: read from the Workload (workload gangs)
    same_node: bool = False
    workload: str = ""           # Workload name (workload gangs)
    pod_group: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def gang_of(pod: Mapping) -> GangRef | None:
    """The gang a pod belongs to, None when it is on its own; GangError when its annotations are wrong."""
    md = pod.get("metadata") or {}
    ns = md.get("namespace", "")
    annotations = md.get("annotations") or {}
    ref = (pod.get("spec") or {}).get("workloadRef")
    topology = annotations.get(GANG_TOPOLOGY)
    if topology is not None and topology not in TOPOLOGIES:
        raise GangError(f"pod {key(pod)}: annotation {GANG_TOPOLOGY}={topology!r} is not a topology; use "
                        f"{', '.join(TOPOLOGIES)} (every member on one node) or leave it out (one node preferred)")
    same_node = topology == "node"
    if ref:
        name, group = str(ref.get("name") or ""), str(ref.get("podGroup") or "")
        replica = ref.get("podGroupReplicaKey")
        gang = f"workload/{name}/{group}" + (f"/{replica}" if replica else "")
        return GangRef(ns, gang, None, same_node, name, group)
    if GANG not in annotations and GANG_SIZE not in annotations:
        return None
    raw = annotations.get(GANG_SIZE)
    if raw is None:
        raise GangError(f"pod {key(pod)}: annotation {GANG} is set but {GANG_SIZE} is missing; add "
                        f"{GANG_SIZE}: N (how many pods the gang has)")
    try:
        size = int(str(raw).strip())
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_GANG:
        raise GangError(f"pod {key(pod)}: annotation {GANG_SIZE}={raw!r} must be a whole number of pods from 1 to "
                        f"{MAX_GANG}")
    name = str(annotations.get(GANG) or "").strip()
    if not name:
        job = (md.get("labels") or {}).get(JOB_NAME)
        if not job:
            raise GangError(f"pod {key(pod)}: annotation {GANG_SIZE} without {GANG}: name the gang "
                            f"({GANG}: NAME), or set it on a Job's pod template (its Job is the gang)")
        name = f"job/{job}"
    return GangRef(ns, name, size, same_node)


def workload_gang_size(workload: Mapping, ref: GangRef) -> int | None:
    """minCount of the pod group's gang policy; None when the group has no gang policy (basic: no gang).
    GangError when the group does not exist (the pod waits, as kube-scheduler keeps it pending)."""
    for group in (workload.get("spec") or {}).get("podGroups") or []:
        if group.get("name") == ref.pod_group:
            gang = (group.get("policy") or {}).get("gang")
            if gang is None:
                return None
            return max(1, int(gang.get("minCount") or 1))
    raise GangError(f"Workload {ref.namespace}/{ref.workload} has no pod group {ref.pod_group!r}: the pod waits "
                    "until the Workload defines it")


def members(ref: GangRef, pods: Iterable[Mapping]) -> list[Mapping]:
    """The gang's pods that are not finished or deleted, by name (the order the gang is allocated in)."""
    out = []
    for p in pods:
        md = p.get("metadata") or {}
        if md.get("namespace", "") != ref.namespace or md.get("deletionTimestamp"):
            continue
        if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        try:
            g = gang_of(p)
        except GangError:
            continue
        if g is not None and g.name == ref.name:
            out.append(p)
    return sorted(out, key=lambda p: p["metadata"]["name"])


def pending_members(ref: GangRef, pods: Iterable[Mapping]) -> list[Mapping]:
    return [p for p in members(ref, pods) if is_pending(p)]


__all__ = ["GANG", "GANG_SIZE", "GANG_TOPOLOGY", "GangError", "GangRef", "WORKLOAD_API", "gang_of", "members",
           "pending_members", "workload_gang_size"]
