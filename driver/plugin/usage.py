"""Usage of prepared claims' devices, sampled from NVML and exported as metrics (issue 14).

Every ``--usage-interval`` seconds, per prepared device of a claim (driver/plugin/observers.py):

===========  ==============================================  ===============================================
device       utilization (``partita_gpu_utilization_ratio``)   memory used (``partita_gpu_memory_used_bytes``)
===========  ==============================================  ===============================================
whole GPU    nvmlDeviceGetUtilizationRates ``gpu`` / 100     nvmlDeviceGetMemoryInfo ``used``
MIG device   GPM (nvmlGpmMigSampleGet, Hopper and newer):    nvmlDeviceGetMemoryInfo of the MIG device
             the GPU instance's utilization since the last
             sample; unknown on Ampere (NVML reports none)
share        the share's processes' SM utilization           the share's processes' used memory
             (nvmlDeviceGetProcessUtilization) summed        (nvmlDeviceGetComputeRunningProcesses)
===========  ==============================================  ===============================================

A share's processes are found by process: each compute process on the GPU is mapped to a claim through
``/proc/<pid>/environ`` (``PARTITA_CLAIM_UID`` and ``PARTITA_SHARE_ID``, which the claim's CDI spec puts into
its containers), else ``/proc/<pid>/cgroup`` (the pod UID in the kubepods cgroup path, matched with the
claim's ``reservedFor``). Both need the plugin to see the workloads' processes (``hostPID: true``; NVML
reports host PIDs) and, for environ, root. Where no process can be mapped and the GPU holds one share only,
every process on it is that share's; otherwise the share's utilization is unknown and not exported.

``partita_gpu_memory_allocated_bytes`` is what the claim got: the whole GPU's memory, the MIG profile's, or
the share's consumed ``memory`` capacity. ``partita_gpu_device_info`` (value 1) joins each claim's device to
the physical GPU (``gpu_uuid``, dcgm-exporter's ``UUID``) and MIG instance (``mig_uuid``, ``gpu_instance_id``,
dcgm-exporter's ``GPU_I_ID``): docs/monitoring.md. Labels ``pod_namespace``/``pod_name`` name the first pod
of the claim's ``reservedFor`` (one series per claim device, whatever the number of pods). Admin-access
devices (monitoring) are not a use and get no series. Every series of a claim is removed when it is
unprepared, so the series count is bounded by the prepared claims.

The claim's utilization (the highest of its devices, unknown when one is unknown) feeds the idle detector
(driver/plugin/idle.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from driver.api import constants as C
from driver.nvml import NvmlBackend, NvmlError
from driver.nvml.errors import NotSupportedError
from driver.plugin import metrics
from driver.plugin.observers import ClaimView, DeviceView

log = logging.getLogger(__name__)

_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True)
class ProcessOwner:
    claim_uid: str = ""
    share_id: str = ""
    pod_uid: str = ""


class ProcessOwners:
    """Which claim (and share) or pod a process belongs to, from ``<proc_root>/<pid>/{environ,cgroup}``."""

    def __init__(self, proc_root: Path | str = "/proc"):
        self.proc_root = Path(proc_root)

    def owner(self, pid: int) -> ProcessOwner | None:
        base = self.proc_root / str(int(pid))
        claim = share = pod = ""
        try:
            for item in (base / "environ").read_bytes().split(b"\0"):
                key, _, value = item.partition(b"=")
                if key == b"PARTITA_CLAIM_UID":
                    claim = value.decode(errors="replace")
                elif key == b"PARTITA_SHARE_ID":
                    share = value.decode(errors="replace")
        except OSError:
            pass                          # gone, another PID namespace, or no permission: try the cgroup
        try:
            m = _POD_UID.search((base / "cgroup").read_text(errors="replace"))
            if m:
                pod = m.group(1).replace("_", "-")
        except OSError:
            pass
        if not (claim or pod):
            return None
        return ProcessOwner(claim, share, pod)


@dataclass(frozen=True)
class DeviceUsage:
    utilization: float | None       # 0..1; None: NVML does not say
    memory_used: int | None         # bytes; None: NVML does not say


def _labels(node: str, claim: ClaimView, d: DeviceView) -> tuple[str, ...]:
    pod_ns, pod = claim.pods[0] if claim.pods else ("", "")
    uuid = d.mig_uuid if d.mig_uuid else d.gpu_uuid
    return (node, d.device, uuid, d.mode, claim.namespace, claim.name, pod_ns, pod)


class _Pass:
    """NVML answers of one sampling pass, each asked once."""

    def __init__(self, backend: NvmlBackend, since_us: dict[str, int]):
        self.b = backend
        self.since = since_us
        self._cache: dict[tuple, object] = {}

    def get(self, key: tuple, fn: Callable[[], object]) -> object:
        if key not in self._cache:
            try:
                self._cache[key] = fn()
            except NvmlError as e:
                self._cache[key] = e
        return self._cache[key]


class UsageSampler:
    """Samples prepared claims' devices, sets the usage metrics and tells the idle detector. A ClaimObserver."""

    def __init__(self, backend: NvmlBackend, node_name: str, *, owners: ProcessOwners | None = None,
                 idle=None, wall_us: Callable[[], int] = lambda: int(time.time() * 1_000_000)):  # noqa: ANN001
        self.backend = backend
        self.node_name = node_name
        self.owners = owners or ProcessOwners()
        self.idle = idle                                  # driver.plugin.idle.IdleDetector or None
        self._wall_us = wall_us
        self._claims: dict[str, ClaimView] = {}
        self._series: dict[str, set[tuple[str, ...]]] = {}        # uid -> usage label tuples
        self._info: dict[str, set[tuple[str, ...]]] = {}          # uid -> device info label tuples
        self._since: dict[str, int] = {}                          # GPU UUID -> wall time of the last pass (us)
        self._warned: set[str] = set()

    # -- observer ---------------------------------------------------------------------------------
    def prepared(self, claim: ClaimView) -> None:
        self.unprepared(claim.uid, keep_idle=True)
        self._claims[claim.uid] = claim
        for d in self._devices(claim):
            labels = _labels(self.node_name, claim, d)
            metrics.GPU_MEMORY_ALLOCATED.labels(*labels).set(d.memory_allocated_bytes)
            self._series.setdefault(claim.uid, set()).add(labels)
            info = labels + (d.gpu_uuid, d.mig_uuid, "" if d.gpu_instance_id is None else str(d.gpu_instance_id),
                             d.model, d.mig_profile)
            metrics.GPU_DEVICE_INFO.labels(*info).set(1)
            self._info.setdefault(claim.uid, set()).add(info)
        if self.idle is not None:
            self.idle.prepared(claim)

    def unprepared(self, uid: str, keep_idle: bool = False) -> None:
        self._claims.pop(uid, None)
        for labels in self._series.pop(uid, set()):
            for g in (metrics.GPU_UTILIZATION, metrics.GPU_MEMORY_USED, metrics.GPU_MEMORY_ALLOCATED):
                try:
                    g.remove(*labels)
                except KeyError:
                    pass
        for info in self._info.pop(uid, set()):
            try:
                metrics.GPU_DEVICE_INFO.remove(*info)
            except KeyError:
                pass
        if self.idle is not None and not keep_idle:
            self.idle.unprepared(uid)

    @staticmethod
    def _devices(claim: ClaimView) -> list[DeviceView]:
        return [d for d in claim.devices if not d.admin_access]

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self) -> dict[str, float | None]:
        """One pass: per prepared claim its utilization (0..1, the highest of its devices; None when unknown).
        Sets the metrics and feeds the idle detector."""
        now_us = self._wall_us()
        p = _Pass(self.backend, self._since)
        out: dict[str, float | None] = {}
        for uid, claim in list(self._claims.items()):
            values: list[float | None] = []
            for d in self._devices(claim):
                u = self._device_usage(p, claim, d)
                labels = _labels(self.node_name, claim, d)
                self._set(metrics.GPU_UTILIZATION, labels, u.utilization)
                self._set(metrics.GPU_MEMORY_USED, labels, u.memory_used)
                values.append(u.utilization)
            out[uid] = None if not values or any(v is None for v in values) else max(v for v in values
                                                                                    if v is not None)
        for uuid in {d.gpu_uuid for c in self._claims.values() for d in c.devices}:
            self._since[uuid] = now_us
        if self.idle is not None:
            for uid, u in out.items():
                self.idle.observe(uid, u)
        return out

    @staticmethod
    def _set(gauge, labels: tuple[str, ...], value: float | int | None) -> None:  # noqa: ANN001
        if value is None:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass
        else:
            gauge.labels(*labels).set(value)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.info(msg, *args)

    def _device_usage(self, p: _Pass, claim: ClaimView, d: DeviceView) -> DeviceUsage:
        b = self.backend
        h = p.get(("handle", d.gpu_uuid), lambda: b.device_by_uuid(d.gpu_uuid))
        if isinstance(h, NvmlError):
            self._warn_once(f"h/{d.gpu_uuid}", "GPU %s: no usage (%s)", d.gpu_uuid, h)
            return DeviceUsage(None, None)
        if d.type == C.DEVICE_TYPE_MIG:
            return self._mig_usage(p, h, d)
        if d.type == C.DEVICE_TYPE_SHARED:
            return self._share_usage(p, h, claim, d)
        rates = p.get(("rates", d.gpu_uuid), lambda: b.utilization_rates(h))
        mem = p.get(("mem", d.gpu_uuid), lambda: b.memory_info(h))
        if isinstance(rates, NvmlError):
            self._warn_once(f"rates/{d.gpu_uuid}", "GPU %s: utilization not available: %s", d.gpu_uuid, rates)
        return DeviceUsage(None if isinstance(rates, NvmlError) else rates.gpu / 100,   # type: ignore[attr-defined]
                           None if isinstance(mem, NvmlError) else mem.used)             # type: ignore[attr-defined]

    def _mig_usage(self, p: _Pass, h: object, d: DeviceView) -> DeviceUsage:
        b = self.backend
        util: float | None = None
        if d.gpu_instance_id is not None:
            u = p.get(("gpm", d.gpu_uuid, d.gpu_instance_id), lambda: b.mig_utilization(h, d.gpu_instance_id))
            if isinstance(u, NotSupportedError):
                self._warn_once(f"gpm/{d.gpu_uuid}", "GPU %s: MIG instance utilization not available (%s); MIG "
                                "claims there export memory only and are never reported idle", d.gpu_uuid, u)
            elif isinstance(u, NvmlError):
                self._warn_once(f"gpm/{d.gpu_uuid}/{d.gpu_instance_id}", "MIG device %s: utilization: %s",
                                d.mig_uuid, u)
            elif u is not None:
                util = float(u) / 100                                     # type: ignore[arg-type]
        used: int | None = None
        if d.mig_uuid:
            mh = p.get(("mig", d.mig_uuid), lambda: b.mig_device_handle(d.mig_uuid))
            if not isinstance(mh, NvmlError):
                mem = p.get(("mem", d.mig_uuid), lambda: b.memory_info(mh))
                used = None if isinstance(mem, NvmlError) else mem.used      # type: ignore[attr-defined]
        return DeviceUsage(util, used)

    def _share_usage(self, p: _Pass, h: object, claim: ClaimView, d: DeviceView) -> DeviceUsage:
        b = self.backend
        procs = p.get(("procs", d.gpu_uuid), lambda: b.compute_processes(h))
        samples = p.get(("putil", d.gpu_uuid), lambda: b.process_utilization(h, self._since.get(d.gpu_uuid, 0)))
        if isinstance(procs, NvmlError):
            self._warn_once(f"procs/{d.gpu_uuid}", "GPU %s: compute processes not available: %s", d.gpu_uuid, procs)
            return DeviceUsage(None, None)
        pids = [pr.pid for pr in procs]                                       # type: ignore[attr-defined]
        mine = self._pids_of(p, claim, d, pids)
        if mine is None:
            return DeviceUsage(None, None)
        used = sum(pr.used_gpu_memory or 0 for pr in procs if pr.pid in mine)   # type: ignore[attr-defined]
        if isinstance(samples, NvmlError):
            self._warn_once(f"putil/{d.gpu_uuid}", "GPU %s: per-process utilization not available (%s); shares "
                            "there export memory only", d.gpu_uuid, samples)
            return DeviceUsage(None, used)
        util = sum(s.sm_util for s in samples if s.pid in mine) / 100           # type: ignore[attr-defined]
        return DeviceUsage(min(1.0, util), used)

    def _pids_of(self, p: _Pass, claim: ClaimView, d: DeviceView, pids: list[int]) -> set[int] | None:
        """The processes of a claim's share; None when they cannot be told apart from other shares'."""
        owners = {pid: p.get(("owner", pid), lambda pid=pid: self.owners.owner(pid)) for pid in pids}
        mine = set()
        for pid, o in owners.items():
            if not isinstance(o, ProcessOwner):
                continue
            if o.claim_uid == claim.uid and (not o.share_id or not d.share_id or o.share_id == d.share_id):
                mine.add(pid)
            elif not o.claim_uid and o.pod_uid and o.pod_uid in claim.pod_uids:
                mine.add(pid)
        if mine or any(isinstance(o, ProcessOwner) for o in owners.values()):
            return mine
        holders = {c.uid for c in self._claims.values() for x in self._devices(c)
                   if x.type == C.DEVICE_TYPE_SHARED and x.gpu_uuid == d.gpu_uuid}
        if holders == {claim.uid}:
            return set(pids)             # the only share on the GPU: every process is its
        if pids:
            self._warn_once(f"owners/{d.gpu_uuid}", "GPU %s: %d processes of %d shares cannot be told apart (the "
                            "plugin cannot read their /proc entries: hostPID?); share utilization is not exported",
                            d.gpu_uuid, len(pids), len(holders))
            return None
        return set()

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - sampling never takes the plugin down
                log.exception("usage sampling failed")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass
