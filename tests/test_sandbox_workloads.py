"""The sandbox's workload stand-ins without processes: StatefulSet and Deployment expansion, and the Job
controller stand-in driven by hand (pods marked Running as the kubelet would, a clock moved by the test)."""

from __future__ import annotations

import textwrap

import pytest

from controller.sandbox import manifests as mf
from controller.sandbox.apiserver import ApiServer
from controller.sandbox.jobs import COMPLETION_INDEX, JOB_NAME, JobController

POD_TEMPLATE = """\
  template:
    metadata: {labels: {app: x}}
    spec:
      restartPolicy: Never
      containers:
      - {name: c, image: busybox, resources: {claims: [{name: gpu}]}}
      resourceClaims:
      - {name: gpu, resourceClaimTemplateName: one-gpu}
"""


def _load(tmp_path, text: str, notes: list[str] | None = None) -> list[mf.Manifest]:
    path = tmp_path / "w.yaml"
    path.write_text(text)
    return mf.load([path], notes)


def test_a_statefulset_becomes_ordinal_pods_and_its_volume_claim_templates_a_note(tmp_path) -> None:
    notes: list[str] = []
    pods = _load(tmp_path, textwrap.dedent("""\
        apiVersion: apps/v1
        kind: StatefulSet
        metadata: {name: nb, namespace: lab}
        spec:
          replicas: 3
          serviceName: nb
          selector: {matchLabels: {app: x}}
          volumeClaimTemplates:
          - metadata: {name: home}
            spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
        """) + POD_TEMPLATE, notes)
    assert [p.obj["metadata"]["name"] for p in pods] == ["nb-0", "nb-1", "nb-2"]
    md = pods[2].obj["metadata"]
    assert md["namespace"] == "lab" and md["labels"]["statefulset.kubernetes.io/pod-name"] == "nb-2"
    assert md["labels"]["apps.kubernetes.io/pod-index"] == "2" and md["labels"]["app"] == "x"
    assert md["annotations"][mf.CREATED_BY] == "StatefulSet/nb"
    assert pods[0].obj["spec"]["resourceClaims"] == [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}]
    assert pods[0].obj["spec"] is not pods[1].obj["spec"]         # each pod its own spec
    [note] = notes
    assert "(StatefulSet nb): volumeClaimTemplates (home) ignored" in note


def test_a_misspelled_statefulset_field_is_refused_as_kubectl_apply_would(tmp_path) -> None:
    with pytest.raises(mf.ManifestError, match=r'\(StatefulSet nb\).*unknown field "spec.replica"'):
        _load(tmp_path, "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: nb}\nspec:\n  replica: 2\n"
              + POD_TEMPLATE)


def _job(tmp_path, spec: str) -> mf.Manifest:
    [m] = _load(tmp_path, "apiVersion: batch/v1\nkind: Job\nmetadata: {name: train}\nspec:\n" + spec + POD_TEMPLATE)
    return m


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run_all(server: ApiServer) -> None:
    """What the kubelet stand-in does once a pod's claims are prepared."""
    for p in server.list("pods"):
        if (p.get("status") or {}).get("phase", "Pending") == "Pending":
            p["status"] = {**(p.get("status") or {}), "phase": "Running"}
            server.update_status(p)


def _phases(server: ApiServer) -> dict[str, str]:
    return {p["metadata"]["name"]: (p.get("status") or {}).get("phase", "Pending") for p in server.list("pods")}


def test_the_job_stand_in_keeps_parallelism_pods_until_completions_succeeded(tmp_path) -> None:
    server, clock = ApiServer(), Clock()
    jobs = JobController(server, run_time=2.0, clock=clock)
    jobs.add(_job(tmp_path, "  completions: 3\n  parallelism: 2\n"))
    jobs.sync()
    assert _phases(server) == {"train-0": "Pending", "train-1": "Pending"}
    assert jobs.busy(grace=5.0)              # pods just created: their claims are on the way
    assert server.get("pods", "train-0", "default")["metadata"]["labels"][JOB_NAME] == "train"
    _run_all(server)
    jobs.sync()
    clock.now += 1.9
    jobs.sync()
    assert set(_phases(server).values()) == {"Running"}            # not yet run_time
    clock.now += 0.2
    jobs.sync()
    # both succeeded; one more pod makes the third completion (never more than completions)
    assert _phases(server) == {"train-0": "Succeeded", "train-1": "Succeeded", "train-2": "Pending"}
    [p] = jobs.progress()
    assert (p["completions"], p["running"], p["pending"], p["complete"]) == ("2/3", 0, 1, False)
    # pending for a reason, devices just freed: busy within the grace, then stuck
    assert jobs.busy(grace=5.0) and not jobs.busy(grace=0.0)
    _run_all(server)
    jobs.sync()
    clock.now += 2.0
    jobs.sync()
    [p] = jobs.progress()
    assert (p["completions"], p["complete"], p["pods"]) == ("3/3", True, ["train-0", "train-1", "train-2"])
    assert not jobs.busy(grace=100.0)
    jobs.sync()
    assert len(server.list("pods")) == 3


def test_an_indexed_job_reuses_the_index_of_a_deleted_pod_and_stops_when_deleted(tmp_path) -> None:
    server, clock = ApiServer(), Clock()
    jobs = JobController(server, run_time=1.0, clock=clock)
    jobs.add(_job(tmp_path, "  completions: 2\n  parallelism: 2\n  completionMode: Indexed\n"))
    jobs.sync()
    assert _phases(server) == {"train-0": "Pending", "train-1": "Pending"}
    assert server.get("pods", "train-1", "default")["metadata"]["labels"][COMPLETION_INDEX] == "1"
    server.delete("pods", "train-1", "default")
    jobs.sync()
    assert sorted(_phases(server)) == ["train-0", "train-1"]      # index 1 again, a new pod
    jobs.stop()                                                  # the Job is deleted: no more pods
    server.delete("pods", "train-0", "default")
    jobs.sync()
    assert sorted(_phases(server)) == ["train-1"] and not jobs.busy()


def test_a_job_pod_template_must_not_restart_always(tmp_path) -> None:
    with pytest.raises(mf.ManifestError, match=r"\(Job train\): spec.template.spec.restartPolicy must be Never or "
                                               r"OnFailure for a Job, got 'Always'"):
        _load(tmp_path, "apiVersion: batch/v1\nkind: Job\nmetadata: {name: train}\nspec:\n"
              + POD_TEMPLATE.replace("Never", "Always"))


def test_the_reaper_finds_only_the_sandboxs_own_processes_under_its_work_folder(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from controller.sandbox.reaper import processes_under, reap

    code = "import time; time.sleep(60)"
    stranger = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x")])          # names the folder
    standin = subprocess.Popen([sys.executable, "-c", code, "-m", "driver.plugin.mps_standin", "--pipe-dir",
                                str(tmp_path / "n" / "mps")])                              # looks like ours
    elsewhere = subprocess.Popen([sys.executable, "-c", code, "-m", "driver", "plugin", "--cdi-root", "/tmp/other"])
    try:
        assert processes_under(tmp_path) == [standin.pid]
        assert reap(tmp_path, grace=5.0) == [standin.pid]
        standin.wait(5)
        assert not os.path.exists(f"/proc/{standin.pid}")       # stopped (and reaped)
        assert stranger.poll() is None and elsewhere.poll() is None
    finally:
        for p in (stranger, standin, elsewhere):
            p.kill()
            p.wait()
