"""Issue 14 item 4, end to end in the sandbox: with the idle policy on, an idle low-priority notebook in a
namespace labelled ``gpu.partita.dev/idle-policy: annotate`` gets ``gpu.partita.dev/idle-since`` and a
``PartitaIdle`` Event once the node reported its claim idle; an idle notebook in a namespace without the label
and a busy pod in the opted-in namespace are left alone."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from controller.operator.idlepolicy import ANNOTATION_IDLE_SINCE, LABEL, REASON_IDLE, IdleSettings
from controller.sandbox.main import Sandbox
from controller.sandbox.usagefeed import ANNOTATION_MEMORY, ANNOTATION_UTILIZATION
from driver.api import constants as C
from driver.nvml import profile_from_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _namespace(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _template(ns: str) -> dict:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaimTemplate",
            "metadata": {"name": "whole", "namespace": ns},
            "spec": {"spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": C.DEVICE_CLASS_GPU}}]}}}}


def _pod(name: str, ns: str, utilization: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns,
                         "annotations": {ANNOTATION_UTILIZATION: str(utilization), ANNOTATION_MEMORY: "2Gi"}},
            "spec": {"priority": 0,
                     "containers": [{"name": "app", "image": "busybox", "resources": {"claims": [{"name": "gpu"}]}}],
                     "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "whole"}]}}


def test_an_idle_notebook_in_an_opted_in_namespace_is_annotated_and_the_others_are_left_alone() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sbx-idlepolicy-", dir="/tmp"))

    async def main() -> None:
        sb = Sandbox(profile_from_spec("H100-SXM5-80GB:3", "node-a"), workdir,
                     plugin_env={"USAGE_INTERVAL": "0.3", "IDLE_THRESHOLD": "0.1", "IDLE_PERIOD": "1.5"})
        sb.cfg.idle = IdleSettings(enabled=True, grace_seconds=1.0, interval_seconds=0.5)
        await sb.start()
        try:
            server = sb.server
            server.create(_namespace("ml", {LABEL: "annotate"}))
            server.create(_namespace("research", {}))
            for ns in ("ml", "research"):
                server.create(_template(ns))
            server.create(_pod("notebook", "ml", 2))
            server.create(_pod("trainer", "ml", 90))
            server.create(_pod("notebook", "research", 2))
            assert await sb.wait_settled(60), sb.report()[0]

            def annotation(name: str, ns: str) -> str | None:
                pod = server.get("pods", name, ns) or {}
                return ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_IDLE_SINCE)

            def idle_reported(ns: str) -> bool:
                return any(c["type"] == "Idle" and c["status"] == "True"
                           for claim in server.list("resourceclaims", ns, group="resource.k8s.io")
                           for d in (claim.get("status") or {}).get("devices") or [] for c in d.get("conditions") or [])

            await server.wait_for(lambda s: annotation("notebook", "ml"), 40)
            assert idle_reported("research")            # the other notebook is idle too, and stays unannotated
            await asyncio.sleep(2.0)                    # several more evaluations of the policy
            assert annotation("notebook", "research") is None
            assert annotation("trainer", "ml") is None
            events = [e for e in server.list("events", "ml") if e["reason"] == REASON_IDLE]
            assert [e["involvedObject"]["name"] for e in events] == ["notebook"]
            assert not [e for e in server.list("events", "research") if e["reason"] == REASON_IDLE]
            assert server.get("pods", "notebook", "ml")["status"]["phase"] == "Running"    # annotate never evicts
        finally:
            assert await sb.stop() == []

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
