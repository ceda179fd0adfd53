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
    # one GPU from a ResourceClaimTemplate: running, one whole GPU, its CDI device
    assert rows["default/single-gpu"].split()[1:3] == ["Running", "node-a"]
    assert rows["default/single-gpu"].count("(whole NVIDIA H100 80GB HBM3)") == 1
    assert "k8s.gpu.partita.dev/gpu=" in rows["default/single-gpu"]
    # two H100s chosen by CEL: both on the H100 node, two CDI devices
    assert rows["default/two-h100"].count("(whole NVIDIA H100 80GB HBM3)") == 2
    assert rows["default/two-h100"].count("k8s.gpu.partita.dev/gpu=") == 2
    # the unfittable pod is pending, with the reason
    assert rows["default/too-many-gpus"].split()[1] == "Pending"
    pending = out.split("Pending:")[1]
    assert "default/too-many-gpus" in pending and "needs 16" in pending
    # MIG examples: three 1g.10gb replicas, a 3g.40gb pod and "any MIG with >= 20Gi", all running on MIG devices
    for name in ("mig-inference-0", "mig-inference-1", "mig-inference-2"):
        assert rows[f"default/{name}"].split()[1] == "Running" and "(MIG 1g.10gb at" in rows[f"default/{name}"]
    assert "(MIG 3g.40gb at" in rows["default/mig-3g40gb"]
    assert "(MIG " in rows["default/mig-20gi"] and rows["default/mig-20gi"].split()[1] == "Running"
    # sharing examples: nine time-sliced notebooks and two MPS replicas, each on a shared device, never
    # an MPS share on a notebook GPU
    notebooks = {rows[f"default/notebooks-{i}"].split()[3] for i in range(9)}
    mps = {rows[f"default/mps-inference-{i}"].split()[3] for i in range(2)}
    assert all(d.endswith("-shared") for d in notebooks | mps) and not notebooks & mps
    # utilization: pack kept everything on node-a (busy nodes first): 3 whole, 2 MIG, 3 shared GPUs
    util = out.split("GPU utilization:")[1]
    assert [ln.split()[:7] for ln in util.splitlines() if ln.startswith("node-a")] == [
        ["node-a", "8", "8", "3", "2", "3", "477.2Gi"]]
    assert any(ln.startswith("total") and ln.split()[1:3] == ["14", "8"] for ln in util.splitlines())
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
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n")
    r = sandbox("--node", "n=L4:1", "-f", str(bad))
    assert r.returncode == 2
    assert "bad.yaml document 1 (Deployment web)" in r.stderr and "it serves" in r.stderr
    r = sandbox("--node", "n=X100:1")
    assert r.returncode == 2 and "unknown GPU model 'X100'" in r.stderr
    r = sandbox("--node", "justaname")
    assert r.returncode == 2 and "NAME=MODEL:COUNT" in r.stderr
