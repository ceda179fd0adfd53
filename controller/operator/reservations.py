"""The controller's side of the queue policy (:mod:`controller.queuepolicy`): what waits, what the GPUs are
doing, and the devices a reservation withholds.

A GPU is one physical GPU of a node's pool: its whole-GPU device, its MIG placements and its shared device
(every published device whose ``parentUUID`` or ``uuid`` names it). It is busy when any of them is held —
from the allocated state (``AllocatedState.by_pool``), so the cost is that of what is allocated, not of every
device. The controller does not know when work ends, so a busy GPU's expected free time is unknown and
nothing is backfilled onto reserved GPUs.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Mapping

from controller.allocator import AllocatedState, DeviceID, SliceIndex
from controller.queuepolicy import GpuSlot
from driver.api import constants as C

#: (driver, pool, parent GPU uuid)
GpuId = tuple[str, str, str]


class GpuLayout:
    """Per node, its GPUs and their devices (rebuilt when the slices change)."""

    def __init__(self) -> None:
        self._version = -1
        self._gpus: dict[GpuId, tuple[str, frozenset[DeviceID]]] = {}     # gpu -> (node, devices)
        self._parent: dict[tuple[str, str], dict[str, GpuId]] = {}         # (driver, pool) -> device -> gpu

    def _refresh(self, slices: SliceIndex) -> None:
        if slices.version == self._version:
            return
        gpus: dict[GpuId, tuple[str, set[DeviceID]]] = {}
        parent: dict[tuple[str, str], dict[str, GpuId]] = {}
        for s in slices.slices():
            if not s.node_name:
                continue
            for d in s.devices:
                if d.parent is None:
                    continue
                gid = (s.driver, s.pool, str(d.parent))
                gpus.setdefault(gid, (s.node_name, set()))[1].add(d.id)
                parent.setdefault((s.driver, s.pool), {})[d.name] = gid
        self._gpus = {g: (node, frozenset(devs)) for g, (node, devs) in gpus.items()}
        self._parent = parent
        self._version = slices.version

    def slots(self, slices: SliceIndex, allocated: AllocatedState) -> list[GpuSlot]:
        self._refresh(slices)
        busy: set[GpuId] = set()
        for pid, names in allocated.by_pool.items():
            parents = self._parent.get(pid)
            if parents:
                busy.update(parents[n] for n in names if n in parents)
        return [GpuSlot(g, node, g in busy) for g, (node, _) in sorted(self._gpus.items())]

    def devices(self, gpus: Iterable[Hashable]) -> set[DeviceID]:
        out: set[DeviceID] = set()
        for g in gpus:
            got = self._gpus.get(g)  # type: ignore[call-overload]
            if got is not None:
                out |= got[1]
        return out


def gpus_needed(claims: Iterable[Mapping]) -> int:
    """GPUs the claims need on one node: the count of whole-GPU requests, 1 for each other request (a MIG
    device or a share lives on one GPU)."""
    n = 0
    for c in claims:
        for r in ((c.get("spec") or {}).get("devices") or {}).get("requests") or []:
            spec = r.get("exactly") or next(iter(r.get("firstAvailable") or []), {}) or {}
            if spec.get("deviceClassName") == C.DEVICE_CLASS_GPU and spec.get("allocationMode", "ExactCount") == "ExactCount":
                n += int(spec.get("count") or 1)
            else:
                n += 1
    return max(1, n)


def priority(pod: Mapping) -> int:
    """``spec.priority``: admission sets it from the pod's PriorityClass value (0 without one)."""
    try:
        return int((pod.get("spec") or {}).get("priority") or 0)
    except (TypeError, ValueError):
        return 0
