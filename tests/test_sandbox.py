"""``partita sandbox`` end to end: real plugin processes, real controller, stand-ins, the report."""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def sandbox(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller", "sandbox", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_default_sandbox_runs_the_examples_and_cleans_up() -> None:
    r = sandbox()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    table = out.split("\nPending:")[0]
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("default/")}
    # pods run in any order, so where each lands varies; what each gets does not
    status = {pod: row.split()[1] for pod, row in rows.items()}
    training = [f"default/training-{i}" for i in range(6)]
    assert [p for p, s in status.items() if s != "Running" and p not in training] == ["default/too-many-gpus"], out
    # the training Job (examples/job-training.yaml): six runs on whole A100s, more than the A100 node holds
    # at once, so they queued; each finished and released its GPU to the next, and the Job completed
    assert all(status[p] == "Succeeded" for p in training), out
    assert all(rows[p].split()[2] == "node-c" and "(released)" in rows[p] for p in training), out
    jobs = out.split("Jobs:")[1].splitlines()
    assert jobs[1].split()[:2] == ["JOB", "COMPLETIONS"] and jobs[2].split()[:2] == ["default/training", "6/6"]
    assert jobs[2].split()[-1] == "Complete"
    # the StatefulSet (examples/statefulset-notebooks.yaml): ordinal pods, each with its own 20Gi share of an
    # A100 from its ResourceClaimTemplate, and a note that its volumeClaimTemplates were ignored
    for i in range(3):
        assert "(shared: 20Gi of 80Gi)" in rows[f"default/notebook-{i}"] and rows[f"default/notebook-{i}"].split()[2] == "node-c"
    assert "StatefulSet notebook): volumeClaimTemplates (home) ignored" in r.stderr
    assert "waiting for" not in r.stderr          # progress lines only on a terminal or with --progress
    # one GPU from a ResourceClaimTemplate, with its CDI device
    assert rows["default/single-gpu"].count("(whole NVIDIA H100 80GB HBM3)") == 1
    assert "k8s.gpu.partita.dev/gpu=" in rows["default/single-gpu"]
    # two H100s chosen by CEL: two CDI devices on one H100 node
    assert rows["default/two-h100"].count("(whole NVIDIA H100 80GB HBM3)") == 2
    assert rows["default/two-h100"].count("k8s.gpu.partita.dev/gpu=") == 2
    assert rows["default/two-h100"].split()[2] in ("node-a", "node-b")
    # the unfittable pod is pending, with the reason
    pending = out.split("Pending:")[1]
    assert "default/too-many-gpus" in pending and "needs 16" in pending
    # MIG examples: three 1g.10gb replicas, a 3g.40gb pod and "any MIG with >= 20Gi", on MIG devices
    for name in ("mig-inference-0", "mig-inference-1", "mig-inference-2"):
        assert "(MIG 1g.10gb at" in rows[f"default/{name}"]
    assert "(MIG 3g.40gb at" in rows["default/mig-3g40gb"]
    assert "(MIG " in rows["default/mig-20gi"]
    # sharing examples: nine time-sliced notebooks and two MPS replicas on shared devices, never an MPS
    # share on a notebook GPU; two pods of one ResourceClaim on one whole GPU
    notebooks = {rows[f"default/notebooks-{i}"].split()[3] for i in range(9)}
    mps = {rows[f"default/mps-inference-{i}"].split()[3] for i in range(2)}
    assert all(d.endswith("-shared") for d in notebooks | mps) and not notebooks & mps
    assert len(notebooks) == 2 and len(mps) == 1
    a, b = rows["default/shared-claim-a"].split(), rows["default/shared-claim-b"].split()
    assert a[2:4] == b[2:4] and "(whole" in rows["default/shared-claim-a"]
    # utilization: pack fills busy H100 nodes first; the idle L4 node is never opened
    util = out.split("GPU utilization:")[1]
    in_use = {ln.split()[0]: int(ln.split()[2]) for ln in util.splitlines() if ln.startswith("node-")}
    assert in_use["node-a"] + in_use["node-b"] >= 8 and in_use["node-d"] == 0, util
    # the monitoring pod (adminAccess, all GPUs of its node) runs next to the workloads, which its
    # claim does not count against (it is no allocation)
    monitor = next(ln for ln in out.splitlines() if ln.startswith("gpu-monitoring/gpu-monitor "))
    assert monitor.split()[1] == "Running" and "(whole NVIDIA" in monitor, out
    assert "every claim was unprepared" in out


def test_custom_nodes_manifests_and_json_output(tmp_path) -> None:
    wl = tmp_path / "wl.yaml"
    wl.write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Namespace
        metadata: {name: team-a}
        ---
        apiVersion: resource.k8s.io/v1
        kind: ResourceClaim
        metadata: {name: l4, namespace: team-a}
        spec:
          devices:
            requests:
            - name: gpu
              exactly:
                deviceClassName: gpu.partita.dev
                selectors:
                - cel: {expression: "device.attributes['gpu.partita.dev'].productName == 'NVIDIA L4'"}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: infer, namespace: team-a}
        spec:
          containers:
          - name: app
            image: busybox
            resources: {claims: [{name: gpu}]}
          resourceClaims:
          - {name: gpu, resourceClaimName: l4}
        """))
    r = sandbox("--node", "big=H100-SXM5-80GB:2", "--node", "small=L4:1", "-f", str(wl), "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    [p] = data["pods"]
    assert (p["name"], p["phase"], p["node"]) == ("team-a/infer", "Running", "small")
    [dev] = p["claims"]["l4"]
    assert dev["pool"] == "small" and dev["cdi"][0].startswith("k8s.gpu.partita.dev/gpu=")


def test_bad_input_is_reported_with_the_fix(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: web}\n")
    r = sandbox("--node", "n=L4:1", "-f", str(bad))
    assert r.returncode == 2
    assert "bad.yaml document 1 (DaemonSet web)" in r.stderr and "it serves" in r.stderr
    assert "Deployment (apps/v1, as pods)" in r.stderr and "StatefulSet (apps/v1, as pods)" in r.stderr
    assert "Job (batch/v1, by a Job stand-in)" in r.stderr
    bad.write_text("apiVersion: batch/v1\nkind: Job\nmetadata: {name: train}\nspec:\n  template:\n    spec:\n"
                   "      containers: [{name: c, image: busybox}]\n")
    r = sandbox("--node", "n=L4:1", "-f", str(bad))
    assert r.returncode == 2 and "(Job train): spec.template.spec.restartPolicy must be Never or OnFailure" in r.stderr
    r = sandbox("--node", "n=L4:1", "--log-level", "bogus")
    assert r.returncode == 2 and "invalid log level 'bogus'" in r.stderr and "Traceback" not in r.stderr
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n")
    r = sandbox("--node", "n=L4:1", "-f", str(bad))
    assert r.returncode == 2 and "(Deployment web): spec.template.spec.containers is required" in r.stderr
    r = sandbox("--node", "n=X100:1")
    assert r.returncode == 2 and "unknown GPU model 'X100'" in r.stderr
    r = sandbox("--node", "justaname")
    assert r.returncode == 2 and "NAME=MODEL:COUNT" in r.stderr


def test_a_manifest_the_api_server_would_refuse_exits_2_naming_the_object_and_field(tmp_path) -> None:
    wl = tmp_path / "wl.yaml"
    wl.write_text(textwrap.dedent("""\
        apiVersion: resource.k8s.io/v1
        kind: ResourceClaim
        metadata: {name: typo}
        spec:
          devices:
            requests:
            - name: gpu
              exactly:
                deviceClass: gpu.partita.dev
        """))
    r = sandbox("--node", "n=L4:1", "-f", str(wl))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "wl.yaml document 1 (ResourceClaim typo)" in r.stderr
    assert 'strict decoding error: unknown field "spec.devices.requests[0].exactly.deviceClass"' in r.stderr
    assert "Starting" not in r.stdout          # refused before any node starts
    wl.write_text(textwrap.dedent("""\
        apiVersion: resource.k8s.io/v1
        kind: ResourceClaim
        metadata: {name: badcel}
        spec:
          devices:
            requests:
            - name: gpu
              exactly:
                deviceClassName: gpu.partita.dev
                selectors:
                - cel: {expression: "device.attributes['gpu.partita.dev'].productName = 'NVIDIA L4'"}
        """))
    r = sandbox("--node", "n=L4:1", "-f", str(wl))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "(ResourceClaim badcel): the API server refuses it (422 Invalid, field " \
           "spec.devices.requests[0].exactly.selectors[0].cel.expression)" in r.stderr
    assert "compilation failed" in r.stderr


JOB = """\
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: one-gpu}
spec:
  spec:
    devices:
      requests:
      - name: gpu
        exactly: {deviceClassName: gpu.partita.dev}
---
apiVersion: batch/v1
kind: Job
metadata: {name: train}
spec:
  completions: 3
  parallelism: 2
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: c
        image: busybox
        resources: {claims: [{name: gpu}]}
      resourceClaims:
      - {name: gpu, resourceClaimTemplateName: one-gpu}
"""


def test_a_job_queues_for_the_one_gpu_and_completes(tmp_path) -> None:
    wl = tmp_path / "job.yaml"
    wl.write_text(JOB)
    r = sandbox("--node", "n=L4:1", "-f", str(wl), "--job-run-time", "0.5", "-o", "yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    data = yaml.safe_load(r.stdout)          # stdout holds the report only
    [job] = data["jobs"]
    assert (job["name"], job["completions"], job["complete"]) == ("default/train", "3/3", True)
    assert job["pods"] == ["train-0", "train-1", "train-2"] and job["parallelism"] == 2
    # one GPU, two pods wanted at a time: every pod ran, one after the other, on the node's only GPU
    assert sorted((p["name"], p["phase"], p["node"]) for p in data["pods"]) == [
        (f"default/train-{i}", "Succeeded", "n") for i in range(3)]


def _running_under(workdir: str) -> list[int]:
    from controller.sandbox.reaper import processes_under

    return processes_under(pathlib.Path(workdir))


@pytest.mark.parametrize("sig, keep_running", [(signal.SIGTERM, True), (signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_stops_every_child_and_removes_the_work_folder(tmp_path, sig, keep_running) -> None:
    mps = pathlib.Path(__file__).resolve().parents[1] / "examples" / "shared-mps-inference.yaml"
    args = ["--node", "n=H100-SXM5-80GB:1", "-f", str(mps), "--progress"]
    wait_for = "keeps running" if keep_running else "Applying"
    proc = subprocess.Popen([sys.executable, "-m", "controller", "sandbox", *args,
                             *(["--keep-running"] if keep_running else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if wait_for in line:
                break
        out = "".join(lines)
        workdir = re.search(r"work directory (\S+)", out).group(1)
        children = _running_under(workdir)
        assert children, out           # the plugin (and, with the MPS workload running, its MPS stand-in)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, out + rest + err
    assert "Traceback" not in err, err
    assert f"{signal.Signals(sig).name}: stopping" in err
    assert not pathlib.Path(workdir).exists()
    assert _running_under(workdir) == []
    assert [p for p in children if _alive(p)] == []


def _alive(pid: int) -> bool:
    """Running, that is: not gone and not a zombie waiting for init to reap it."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_failed_run_leaves_no_process_and_no_work_folder(tmp_path) -> None:
    wl = tmp_path / "job.yaml"
    wl.write_text(JOB)
    # the Job's pods "run" for a minute, so the pods cannot settle within a second: the run fails
    r = sandbox("--node", "n=L4:1", "-f", str(wl), "--timeout", "1", "--job-run-time", "60")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the pods did not settle within 1s" in r.stderr and "Job default/train 0/3 complete" in r.stderr
    workdir = re.search(r"work directory (\S+)", r.stdout).group(1)
    assert not pathlib.Path(workdir).exists() and _running_under(workdir) == []
