"""``partita sandbox`` end to end: real plugin processes, real controller, stand-ins, the report."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def sandbox(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller", "sandbox", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_default_sandbox_runs_the_examples_and_cleans_up() -> None:
    r = sandbox()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("default/")}
    # pods run in any order, so where each lands varies; what each gets does not
    status = {pod: row.split()[1] for pod, row in rows.items()}
    assert [p for p, s in status.items() if s != "Running"] == ["default/too-many-gpus"], out
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
    bad.write_text("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: web}\n")
    r = sandbox("--node", "n=L4:1", "-f", str(bad))
    assert r.returncode == 2
    assert "bad.yaml document 1 (StatefulSet web)" in r.stderr and "it serves" in r.stderr
    assert "Deployment (apps/v1, as pods)" in r.stderr
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
