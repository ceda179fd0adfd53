"""A stand-in for kube-controller-manager's Job controller, and for containers that finish.

For each ``batch/v1`` Job it creates pods from the template, at most ``spec.parallelism`` active at a
time, until ``spec.completions`` pods succeeded (``completions`` unset: ``parallelism``, as a work queue
whose pods all succeed). Pods are named ``<job>-<n>`` in creation order (``<job>-<index>`` with
``completionMode: Indexed``, labelled ``batch.kubernetes.io/job-completion-index``) instead of upstream's
random suffix, so the report reads the same on every run, and labelled ``job-name`` and
``batch.kubernetes.io/job-name`` as upstream labels them.

The sandbox runs no containers: a Job's pod that has run for ``run_time`` seconds is marked
``Succeeded`` (its container exited 0). From there the ordinary path frees its devices: the kubelet
stand-in unprepares the pod's claims, the claim controller stand-in drops it from ``reservedFor`` and
deletes its generated claims, the controller releases the allocations, and the next pods get them.

The Job objects themselves live here (the API emulator does not serve ``batch/v1``); :meth:`progress`
is what ``kubectl get jobs`` would show.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from .apiserver import ApiError, ApiServer
from .manifests import Manifest, pod_of

log = logging.getLogger(__name__)
JOB_NAME = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME = "job-name"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
TERMINAL = ("Succeeded", "Failed")


@dataclass
class Job:
    manifest: Manifest
    namespace: str
    name: str
    completions: int
    parallelism: int
    indexed: bool
    pods: list[str] = field(default_factory=list)        # names of the pods created, in order
    succeeded: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)          # pods deleted before they finished
    started: float | None = None
    finished: float | None = None
    problem: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def complete(self) -> bool:
        return len(self.succeeded) >= self.completions


class JobController:
    def __init__(self, server: ApiServer, run_time: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.server = server
        self.run_time = run_time
        self.clock = clock
        self.jobs: list[Job] = []
        self._running_since: dict[str, float] = {}       # pod uid -> when this stand-in first saw it Running
        self.last_change: float | None = None            # when a Job's pod last succeeded or was created
        self.stopped = False                              # the Jobs are being deleted: no more pods

    def add(self, m: Manifest) -> Job:
        md = m.obj.get("metadata") or {}
        spec = m.obj.get("spec") or {}
        parallelism = spec.get("parallelism", 1)
        completions = spec.get("completions")
        job = Job(m, md.get("namespace") or "default", md["name"],
                  parallelism if completions is None else completions, parallelism,
                  spec.get("completionMode") == "Indexed")
        self.jobs.append(job)
        return job

    # -- one level-triggered pass -----------------------------------------------------------------
    def stop(self) -> None:
        """As when the Jobs are deleted: no more pods are created or finished."""
        self.stopped = True

    def sync(self) -> None:
        if not self.jobs or self.stopped:
            return
        now = self.clock()
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self.server.list("pods")}
        for job in self.jobs:
            active = 0
            for name in job.pods:
                pod = pods.get((job.namespace, name))
                if pod is None:
                    job.gone.add(name)    # deleted: neither active nor succeeded (the Job replaces it)
                    continue
                phase = (pod.get("status") or {}).get("phase", "Pending")
                if phase == "Running" and not pod["metadata"].get("deletionTimestamp"):
                    since = self._running_since.setdefault(pod["metadata"]["uid"], now)
                    if now - since >= self.run_time and self._finish(pod):
                        phase = "Succeeded"
                        self.last_change = now
                if phase == "Succeeded":
                    job.succeeded.add(name)
                elif phase not in TERMINAL:
                    active += 1
            if job.complete:
                job.finished = job.finished or now
                continue
            while not job.problem and active < job.parallelism and len(job.succeeded) + active < job.completions:
                if not self._create(job, now, pods):
                    break
                active += 1

    def _finish(self, pod: dict) -> bool:
        """The pod's containers exited 0."""
        md = pod["metadata"]
        fresh = self.server.get("pods", md["name"], md["namespace"])
        if fresh is None or (fresh.get("status") or {}).get("phase") != "Running":
            return False
        fresh["status"] = {**(fresh.get("status") or {}), "phase": "Succeeded",
                           "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}]}
        try:
            self.server.update_status(fresh)
        except ApiError as e:
            log.debug("pod %s/%s: %s", md["namespace"], md["name"], e)
            return False
        return True

    def _next_name(self, job: Job, pods: dict) -> tuple[str, dict[str, str]]:
        labels = {JOB_NAME: job.name, LEGACY_JOB_NAME: job.name}
        if not job.indexed:
            return f"{job.name}-{len(job.pods)}", labels
        taken = set(job.pods) - job.gone          # active or succeeded: that index is someone's
        index = next(i for i in range(job.completions + len(job.pods) + 1) if f"{job.name}-{i}" not in taken)
        return f"{job.name}-{index}", {**labels, COMPLETION_INDEX: str(index)}

    def _create(self, job: Job, now: float, pods: dict) -> bool:
        name, labels = self._next_name(job, pods)
        pod = pod_of(job.manifest, name, labels).obj
        pod["metadata"]["namespace"] = job.namespace
        if job.indexed:
            pod["metadata"]["annotations"][COMPLETION_INDEX] = labels[COMPLETION_INDEX]
        try:
            self.server.create(pod, keep_status=False, field_validation="Strict")
        except ApiError as e:
            job.problem = f"creating pod {name} failed: {e.code} {e.reason}: {e.message}"
            log.error("Job %s: %s", job.key, job.problem)
            return False
        job.gone.discard(name)
        if name not in job.pods:
            job.pods.append(name)
        job.started = job.started or now
        self.last_change = now
        return True

    # -- what the sandbox asks ------------------------------------------------------------------
    def busy(self, grace: float = 0.0) -> bool:
        """A Job whose pods are running (they finish on their own), that has pods to create, or whose pods
        changed less than ``grace`` seconds ago (devices just released: the controller retries its pending
        pods within its retry backoff)."""
        if self.stopped:
            return False
        recent = self.last_change is not None and self.clock() - self.last_change < grace
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self.server.list("pods")}
        for job in self.jobs:
            if job.complete or job.problem:
                continue
            if recent:
                return True
            phases = [((pods.get((job.namespace, n)) or {}).get("status") or {}).get("phase")
                      for n in job.pods if (job.namespace, n) in pods]
            if "Running" in phases:
                return True
            active = sum(p not in TERMINAL for p in phases)
            if active < job.parallelism and len(job.succeeded) + active < job.completions:
                return True
        return False

    def progress(self) -> list[dict]:
        """Per Job: completions done/wanted, pods running and pending, how long it ran."""
        pods = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in self.server.list("pods")}
        now = self.clock()
        out = []
        for job in self.jobs:
            phases = [((pods.get((job.namespace, n)) or {}).get("status") or {}).get("phase", "Pending")
                      for n in job.pods if (job.namespace, n) in pods]
            end = job.finished or now
            out.append({"name": job.key, "completions": f"{len(job.succeeded)}/{job.completions}",
                        "succeeded": len(job.succeeded), "wanted": job.completions, "parallelism": job.parallelism,
                        "running": phases.count("Running"),
                        "pending": sum(p not in (*TERMINAL, "Running") for p in phases),
                        "complete": job.complete, "pods": list(job.pods),
                        "duration": round(end - job.started, 1) if job.started is not None else None,
                        "problem": job.problem or None})
        return out
