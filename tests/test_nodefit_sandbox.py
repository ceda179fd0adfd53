"""The tester's report, end to end in the sandbox: a Deployment of 20 replicas spread by hostname
(maxSkew 1, DoNotSchedule) with a required node affinity to two of three nodes runs 10 + 10, as
kube-scheduler places it (PodTopologySpread honours the pod's node affinity when it takes the minimum)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DEPLOYMENT = textwrap.dedent("""\
    apiVersion: resource.k8s.io/v1
    kind: ResourceClaimTemplate
    metadata: {name: one-gpu, namespace: default}
    spec:
      spec:
        devices:
          requests:
          - name: gpu
            exactly: {deviceClassName: gpu.partita.dev}
    ---
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: spread, namespace: default}
    spec:
      replicas: 20
      selector: {matchLabels: {app: spread}}
      template:
        metadata: {labels: {app: spread}}
        spec:
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms:
                - matchExpressions:
                  - {key: kubernetes.io/hostname, operator: In, values: [gpu-a, gpu-b]}
          topologySpreadConstraints:
          - maxSkew: 1
            topologyKey: kubernetes.io/hostname
            whenUnsatisfiable: DoNotSchedule
            labelSelector: {matchLabels: {app: spread}}
          containers:
          - name: app
            image: busybox
            resources: {claims: [{name: gpu}]}
          resourceClaims:
          - {name: gpu, resourceClaimTemplateName: one-gpu}
    """)


def test_spread_deployment_with_node_affinity_runs_all_twenty_replicas_ten_and_ten(tmp_path) -> None:
    wl = tmp_path / "spread.yaml"
    wl.write_text(DEPLOYMENT)
    # gpu-c has free GPUs too, but the pods' affinity excludes it: it must not hold the spread's minimum at 0
    r = subprocess.run([sys.executable, "-m", "controller", "sandbox", "--node", "gpu-a=L4:12", "--node", "gpu-b=L4:12",
                        "--node", "gpu-c=L4:4", "-f", str(wl), "-o", "json", "--timeout", "150"],
                       capture_output=True, text=True, timeout=220)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pods = json.loads(r.stdout)["pods"]
    assert len(pods) == 20
    pending = {p["name"]: p["pending"] for p in pods if p["phase"] != "Running"}
    assert not pending, pending
    assert collections.Counter(p["node"] for p in pods) == {"gpu-a": 10, "gpu-b": 10}
