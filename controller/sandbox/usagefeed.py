"""Injected GPU load in the sandbox (issue 14): pods say how busy they are, the fake GPUs report it.

A running pod annotated ``sandbox.partita.dev/gpu-utilization: "2"`` (percent of SM time, 0..100) and
optionally ``sandbox.partita.dev/gpu-memory: "2Gi"`` runs, on each device its claims were prepared with, a
fake compute process with that load (``FakeNvml.set_process_load`` on the node's fake NVML state). The
device's GPU or MIG UUID is read from the claim's ``status.devices`` data, which the plugin wrote (KEP-4817),
so a pod is fed only once its device status is there. Each process also gets an entry in the node's fake
process table (``<workdir>/<node>/proc/<pid>/environ`` with ``PARTITA_CLAIM_UID`` and ``PARTITA_SHARE_ID``,
as the claim's CDI spec gives the container), which the plugin reads through ``--proc-root`` to attribute a
shared GPU's processes to shares. When the pod stops running or goes, its processes go.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from driver.api.quantity import Quantity
from driver.nvml import NvmlError
from driver.nvml.fake import FakeNvml
from driver.nvml.profile import FakeGpuProfile

from .apiserver import ApiServer
from .kubelet import pod_claim_names

log = logging.getLogger(__name__)

ANNOTATION_UTILIZATION = "sandbox.partita.dev/gpu-utilization"
ANNOTATION_MEMORY = "sandbox.partita.dev/gpu-memory"


def proc_root(workdir: Path, node: str) -> Path:
    """The node's fake process table (the plugin's --proc-root in the sandbox)."""
    return workdir / node / "proc"


def _pid(pod_uid: str, device: str) -> int:
    return 20000 + int(hashlib.sha256(f"{pod_uid}/{device}".encode()).hexdigest()[:7], 16)


class UsageFeed:
    def __init__(self, server: ApiServer, profile: FakeGpuProfile, workdir: Path, driver: str,
                 state_dirs: dict[str, Path]):
        self.server = server
        self.profile = profile
        self.workdir = workdir
        self.driver = driver
        self._state_dirs = state_dirs                     # node -> the plugin's fake NVML state directory
        self._nvml: dict[str, FakeNvml] = {}
        self._fed: dict[tuple[str, int], tuple[str, int, int]] = {}   # (node, pid) -> (device UUID, util, bytes)
        self._warned: set[str] = set()

    def _backend(self, node: str) -> FakeNvml | None:
        if node not in self._nvml:
            if node not in self._state_dirs:
                return None
            b = FakeNvml(self.profile, node, self._state_dirs[node])
            b.init()
            self._nvml[node] = b
        return self._nvml[node]

    def _load_of(self, pod: dict) -> tuple[int, int] | None:
        md = pod.get("metadata") or {}
        ann = md.get("annotations") or {}
        if ANNOTATION_UTILIZATION not in ann:
            return None
        key = f"{md.get('namespace')}/{md.get('name')}"
        try:
            util = int(str(ann[ANNOTATION_UTILIZATION]).strip().rstrip("%"))
            if not 0 <= util <= 100:
                raise ValueError
            mem = Quantity.parse(ann.get(ANNOTATION_MEMORY, "0")).as_int()
            if mem < 0:
                raise ValueError
        except ValueError:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("pod %s: annotation %s must be a percentage 0..100 and %s a quantity of bytes "
                            "(e.g. \"2Gi\"); got %r, %r: no load injected", key, ANNOTATION_UTILIZATION,
                            ANNOTATION_MEMORY, ann.get(ANNOTATION_UTILIZATION), ann.get(ANNOTATION_MEMORY))
            return None
        return util, mem

    def wanted(self) -> dict[tuple[str, int], tuple[str, int, int, str, str]]:
        """(node, pid) -> (device UUID, utilization, memory bytes, claim uid, share id) for every fed pod."""
        out: dict[tuple[str, int], tuple[str, int, int, str, str]] = {}
        for pod in self.server.list("pods"):
            load = self._load_of(pod)
            node = (pod.get("spec") or {}).get("nodeName")
            if load is None or not node or (pod.get("status") or {}).get("phase") != "Running":
                continue
            ns = (pod.get("metadata") or {}).get("namespace", "default")
            pod_uid = (pod.get("metadata") or {}).get("uid", "")
            for claim_name in pod_claim_names(pod):
                claim = self.server.get("resourceclaims", claim_name, ns, group="resource.k8s.io") or {}
                for d in (claim.get("status") or {}).get("devices") or []:
                    if d.get("driver") != self.driver or d.get("pool") != node:
                        continue
                    data = d.get("data") or {}
                    uuid = data.get("migUUID") or data.get("gpuUUID")
                    if uuid:
                        out[(node, _pid(pod_uid, f"{d.get('device')}/{d.get('shareID', '')}"))] = (
                            uuid, load[0], load[1], claim["metadata"].get("uid", ""), d.get("shareID") or "")
        return out

    def sync(self) -> None:
        want = self.wanted()
        for (node, pid) in [k for k in self._fed if k not in want]:
            b = self._backend(node)
            if b is not None:
                b.clear_process_load(pid)
            shutil.rmtree(proc_root(self.workdir, node) / str(pid), ignore_errors=True)
            del self._fed[(node, pid)]
        for (node, pid), (uuid, util, mem, claim_uid, share) in want.items():
            if self._fed.get((node, pid)) == (uuid, util, mem):
                continue
            b = self._backend(node)
            if b is None:
                continue
            d = proc_root(self.workdir, node) / str(pid)
            d.mkdir(parents=True, exist_ok=True)
            env = [f"PARTITA_CLAIM_UID={claim_uid}"] + ([f"PARTITA_SHARE_ID={share}"] if share else [])
            (d / "environ").write_bytes("\0".join(env).encode() + b"\0")
            try:
                b.set_process_load(uuid, pid, sm_util=util, memory_used_bytes=mem)
            except NvmlError as e:
                key = f"{node}/{pid}"
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("cannot inject load on device %s of node %s: %s", uuid, node, e)
                continue
            self._fed[(node, pid)] = (uuid, util, mem)
