"""What the sandbox prints: one row per pod, then how much of each node's GPUs is in use.

Built only from API objects (ResourceSlices, claims, pods) plus what the kubelet stand-ins got back from
NodePrepareResources (the CDI device IDs), so it shows what a user of a real cluster could see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from driver.api import constants as C
from driver.api.objects import allocated_node, key, pod_claim_names
from driver.api.quantity import Quantity

from .manifests import CREATED_BY


def _attr(device: Mapping, name: str) -> object:
    v = (device.get("attributes") or {}).get(name) or {}
    return next(iter(v.values()), None) if v else None


def _memory(device: Mapping) -> Quantity:
    cap = ((device.get("capacity") or {}).get(C.CAP_MEMORY) or {}).get("value")
    return Quantity.parse(cap or 0)


def _gib(q: Quantity) -> str:
    v = q.as_int() / 2**30
    return f"{v:.0f}Gi" if abs(v - round(v)) < 0.05 else f"{v:.1f}Gi"


@dataclass
class Gpu:
    node: str
    name: str                  # the whole-GPU device name
    model: str
    memory: Quantity
    whole: bool = False
    mig: list[str] = field(default_factory=list)      # allocated MIG profiles
    shares: list[Quantity] = field(default_factory=list)
    allocated: Quantity = field(default_factory=lambda: Quantity.parse(0))

    @property
    def state(self) -> str:
        if self.whole:
            return "whole"
        if self.mig:
            return "MIG " + "+".join(sorted(self.mig))
        if self.shares:
            return f"shared x{len(self.shares)}"
        return "free"


class Devices:
    """Our devices from the published slices, and the GPU each belongs to."""

    def __init__(self, slices: Iterable[Mapping], driver: str):
        self.by_key: dict[tuple[str, str], Mapping] = {}
        self.gpus: dict[tuple[str, str], Gpu] = {}          # (pool, parent uuid) -> Gpu
        for s in slices:
            spec = s.get("spec") or {}
            if spec.get("driver") != driver:
                continue
            pool = (spec.get("pool") or {}).get("name", "")
            for d in spec.get("devices") or []:
                self.by_key[(pool, d["name"])] = d
                if _attr(d, C.ATTR_TYPE) == C.DEVICE_TYPE_GPU:
                    self.gpus[(pool, str(_attr(d, C.ATTR_UUID)))] = Gpu(
                        spec.get("nodeName") or pool, d["name"], str(_attr(d, C.ATTR_PRODUCT_NAME)), _memory(d))

    def gpu_of(self, pool: str, device: Mapping) -> Gpu | None:
        uuid = _attr(device, C.ATTR_UUID) if _attr(device, C.ATTR_TYPE) == C.DEVICE_TYPE_GPU else _attr(device, C.ATTR_PARENT_UUID)
        return self.gpus.get((pool, str(uuid)))

    def describe(self, result: Mapping) -> str:
        d = self.by_key.get((result.get("pool", ""), result.get("device", "")))
        name = result.get("device", "?")
        if d is None:
            return f"{name} (not published)"
        kind = _attr(d, C.ATTR_TYPE)
        if kind == C.DEVICE_TYPE_MIG:
            return f"{name} (MIG {_attr(d, C.ATTR_MIG_PROFILE)} at {_attr(d, C.ATTR_MIG_PLACEMENT)})"
        if kind == C.DEVICE_TYPE_SHARED:
            used = (result.get("consumedCapacity") or {}).get(C.CAP_MEMORY)
            share = f"{_gib(Quantity.parse(used))} of {_gib(_memory(d))}" if used else "a share"
            return f"{name} (shared: {share})"
        return f"{name} (whole {_attr(d, C.ATTR_PRODUCT_NAME)})"

    def account(self, result: Mapping) -> None:
        pool = result.get("pool", "")
        d = self.by_key.get((pool, result.get("device", "")))
        if d is None:
            return
        gpu = self.gpu_of(pool, d)
        if gpu is None:
            return
        kind = _attr(d, C.ATTR_TYPE)
        if kind == C.DEVICE_TYPE_GPU:
            gpu.whole = True
            gpu.allocated = gpu.allocated + gpu.memory
        elif kind == C.DEVICE_TYPE_MIG:
            gpu.mig.append(str(_attr(d, C.ATTR_MIG_PROFILE)))
            gpu.allocated = gpu.allocated + _memory(d)
        else:
            used = Quantity.parse(((result.get("consumedCapacity") or {}).get(C.CAP_MEMORY)) or 0)
            gpu.shares.append(used)
            gpu.allocated = gpu.allocated + used


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(pods: list[dict], claims: list[dict], slices: list[dict], driver: str,
           cdi: Mapping[str, Mapping[str, list[dict]]], pending: Mapping[str, str], wide: bool = False) -> str:
    """``wide`` adds each pod's claims and the workload (Deployment, StatefulSet, Job) that created it."""
    devices = Devices(slices, driver)
    by_name = {(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in claims}
    rows = [["POD", "STATUS", "NODE", "DEVICES", "CDI DEVICES"] + (["CLAIMS", "CREATED BY"] if wide else [])]
    notes = []
    for c in claims:
        for r in (((c.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []:
            if r.get("driver") == driver and not r.get("adminAccess"):    # admin access is no allocation
                devices.account(r)
    for pod in pods:
        md = pod["metadata"]
        k = key(pod)
        phase = (pod.get("status") or {}).get("phase", "Pending")
        node = (pod.get("spec") or {}).get("nodeName") or ""
        described, cdi_ids = [], []
        names = pod_claim_names(pod)
        for name in names:
            c = by_name.get((md["namespace"], name))
            if c is None:
                continue
            for r in (((c.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []:
                described.append(devices.describe(r))
            node = node or allocated_node(c) or ""
            for d in (cdi.get(k) or {}).get(name) or []:
                cdi_ids += d["cdi"]
        if phase in ("Succeeded", "Failed") and not described:
            described = ["(released)"] if names else []
        row = [k, phase, node or "-", ", ".join(described) or "-", ", ".join(dict.fromkeys(cdi_ids)) or "-"]
        if wide:
            row += [", ".join(names) or "-", (md.get("annotations") or {}).get(CREATED_BY) or "-"]
        rows.append(row)
        if phase == "Pending" and k in pending:
            notes.append(f"  {k}: {pending[k]}")
    out = [_table(rows)]
    if notes:
        out += ["", "Pending:"] + notes
    out += ["", "GPU utilization:", utilization(devices)]
    return "\n".join(out)


def utilization(devices: Devices) -> str:
    rows = [["NODE", "GPUS", "IN USE", "WHOLE", "MIG", "SHARED", "MEMORY ALLOCATED"]]
    per_node: dict[str, list[Gpu]] = {}
    for g in devices.gpus.values():
        per_node.setdefault(g.node, []).append(g)
    total = [0, 0, Quantity.parse(0), Quantity.parse(0)]
    for node, gpus in sorted(per_node.items()):
        used = [g for g in gpus if g.state != "free"]
        mem = sum((g.memory for g in gpus), Quantity.parse(0))
        alloc = sum((g.allocated for g in gpus), Quantity.parse(0))
        pct = 100 * alloc.as_int() / mem.as_int() if mem.as_int() else 0.0
        rows.append([node, str(len(gpus)), str(len(used)), str(sum(g.whole for g in gpus)),
                     str(sum(bool(g.mig) for g in gpus)), str(sum(bool(g.shares) and not g.mig for g in gpus)),
                     f"{_gib(alloc)} of {_gib(mem)} ({pct:.0f}%)"])
        total[0] += len(gpus)
        total[1] += len(used)
        total[2] = total[2] + alloc
        total[3] = total[3] + mem
    pct = 100 * total[2].as_int() / total[3].as_int() if total[3].as_int() else 0.0
    rows.append(["total", str(total[0]), str(total[1]), "", "", "", f"{_gib(total[2])} of {_gib(total[3])} ({pct:.0f}%)"])
    return _table(rows)


def jobs_table(jobs: list[Mapping]) -> str:
    """The Jobs' progress, as ``kubectl get jobs`` shows it plus the pods running and queued."""
    rows = [["JOB", "COMPLETIONS", "RUNNING", "PENDING", "DURATION", "STATUS"]]
    for j in jobs:
        status = "Complete" if j["complete"] else (f"Failed: {j['problem']}" if j.get("problem") else "Running")
        duration = "-" if j.get("duration") is None else f"{j['duration']:.1f}s"
        rows.append([str(j["name"]), str(j["completions"]), str(j["running"]), str(j["pending"]), duration, status])
    return _table(rows)
