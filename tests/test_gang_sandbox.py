"""Gangs end to end in the sandbox (real plugin process, kubelet and Job stand-ins, controller): a 4-pod Job
annotated as a gang never holds GPUs while partial — while another Job keeps 2 of the node's 4 GPUs, none of
its pods gets one; once they are free, all four run at once and complete."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from controller.sandbox import manifests as mf
from controller.sandbox.main import Sandbox
from driver.nvml import profile_from_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
NODE = "gpu-node"

WORKLOAD = """\
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: one-gpu, namespace: default}
spec:
  spec:
    devices:
      requests:
      - {name: gpu, exactly: {deviceClassName: gpu.partita.dev}}
---
apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata: {name: two-gpus, namespace: default}
spec:
  spec:
    devices:
      requests:
      - {name: gpu, exactly: {deviceClassName: gpu.partita.dev, allocationMode: ExactCount, count: 2}}
---
apiVersion: batch/v1
kind: Job
metadata: {name: other, namespace: default}
spec:
  parallelism: 1
  completions: 1
  template:
    spec:
      restartPolicy: Never
      containers:
      - {name: c, image: busybox, resources: {claims: [{name: gpu}]}}
      resourceClaims:
      - {name: gpu, resourceClaimTemplateName: two-gpus}
"""

GANG_JOB = """\
apiVersion: batch/v1
kind: Job
metadata: {name: train, namespace: default}
spec:
  parallelism: 4
  completions: 4
  template:
    metadata:
      annotations: {partita.dev/gang-size: "4"}
    spec:
      restartPolicy: Never
      containers:
      - {name: c, image: busybox, resources: {claims: [{name: gpu}]}}
      resourceClaims:
      - {name: gpu, resourceClaimTemplateName: one-gpu}
"""


def _allocated(server, prefix: str) -> int:  # noqa: ANN001
    return sum(1 for c in server.list("resourceclaims")
               if c["metadata"]["name"].startswith(prefix) and (c.get("status") or {}).get("allocation"))


def _running(server, prefix: str) -> int:  # noqa: ANN001
    return sum(1 for p in server.list("pods")
               if p["metadata"]["name"].startswith(prefix) and (p.get("status") or {}).get("phase") == "Running")


def test_a_4_pod_gang_job_holds_no_gpu_while_partial_and_runs_whole(tmp_path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:4", NODE), workdir, job_run_time=4.0)
        await sb.start()
        try:
            server = sb.server
            (tmp_path / "w.yaml").write_text(WORKLOAD)
            (tmp_path / "gang.yaml").write_text(textwrap.dedent(GANG_JOB))
            first = mf.load([tmp_path / "w.yaml"])
            mf.apply(server, first)
            for job in mf.jobs(first):
                sb.job_controller.add(job)
            await server.wait_for(lambda s: any(c["metadata"]["name"].startswith("other-")
                                                and (c.get("status") or {}).get("allocation")
                                                for c in s.list("resourceclaims")) or None, 60)
            gang = mf.load([tmp_path / "gang.yaml"])
            mf.apply(server, gang)
            for job in mf.jobs(gang):
                sb.job_controller.add(job)
            while_other: set[int] = set()      # gang claims allocated while the other Job holds its 2 GPUs
            together = 0                       # most gang pods running at once
            for _ in range(2400):              # at most about two minutes
                if all(j["complete"] for j in sb.job_controller.progress()):
                    break
                if _allocated(server, "other-"):
                    while_other.add(_allocated(server, "train-"))
                together = max(together, _running(server, "train-"))
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the Jobs did not complete:\n" + sb.report()[0])
            # two GPUs were free meanwhile, yet the gang held none of them; then its four pods ran together
            assert while_other == {0}, (while_other, sb.report()[0])
            assert together == 4, sb.report()[0]
            progress = {j["name"]: j for j in sb.job_controller.progress()}
            assert progress["default/train"]["completions"] == "4/4"
            events = [e for e in server.list("events") if e.get("reason") == "PartitaGangWaiting"
                      or e.get("reason") == "PartitaUnschedulable"]
            assert any("gang default/job/train" in e["message"] for e in events), events
            assert await sb.delete_workload() == []
        finally:
            assert await sb.stop() == []

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
