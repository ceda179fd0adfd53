"""KEP-4817: the claim's ``status.devices``, written by the plugin for the devices it prepared.

After a claim is prepared (driver/plugin/observers.py), one entry per prepared device of this driver and
node's pool: ``driver``, ``pool``, ``device``, ``shareID`` for a share, the conditions ``Ready`` (True:
prepared) and ``Healthy`` (True until the health monitor says otherwise: :meth:`DeviceStatusWriter.
set_device_health`), ``Idle`` once the idle detector reported the claim (driver/plugin/idle.py), and
``data``: which physical GPU the pod got (``gpuUUID``), the MIG device (``migUUID``, ``migProfile``,
``gpuInstanceID``, ``computeInstanceID``), the share id, the device type and the GPU model. After
unprepare the entries of this pool are removed (the API server also drops entries of deallocated devices).

Writes go to the ``resourceclaims/status`` subresource as a PUT with the claim's resourceVersion (a
conflict re-reads and retries), in the background, one writer per claim, coalescing: the newest wanted
state is what is written. A failure is logged and never fails a prepare. Conditions keep their
``lastTransitionTime`` while their status does not change.

The health monitor finds the writer with ``observers.of_type(DeviceStatusWriter)`` (driver/plugin/
telemetry.py builds it) and calls :meth:`DeviceStatusWriter.set_device_health`.

Feature detection: an API server with DRAResourceClaimDeviceStatus off (or older) accepts the write and
drops the field. Seen in the answer, that is logged once and the writer stops trying.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from dataclasses import dataclass
from typing import Any, Callable

from driver.api.kube import Kube, KubeError, claim_path
from driver.api.messages import bound
from driver.logfmt import fields
from driver.plugin.observers import ClaimView, DeviceView

log = logging.getLogger(__name__)

CONDITION_READY = "Ready"
CONDITION_HEALTHY = "Healthy"
#: the contract with `partita status`: type "Idle", status "True"/"False", reason "BelowThreshold"
CONDITION_IDLE = "Idle"
REASON_PREPARED = "Prepared"
REASON_HEALTHY = "DeviceHealthy"
#: upstream limits (pkg/apis/resource/types.go)
MAX_CONDITIONS = 8
MAX_DATA_BYTES = 10 * 1024
#: metav1.Condition allows 32768; Partita's messages are a sentence
MAX_MESSAGE_BYTES = 1024
#: conflicts re-read and retry this often; other failures are retried with these delays (seconds)
MAX_CONFLICTS = 8
RETRY_DELAYS = (0.2, 1.0, 3.0)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Condition:
    type: str
    status: str           # "True" | "False" | "Unknown"
    reason: str
    message: str = ""


@dataclass
class _Health:
    healthy: bool
    reason: str
    message: str


def device_data(d: DeviceView) -> dict[str, Any]:
    """The ``data`` object of a device's entry (no empty fields)."""
    out: dict[str, Any] = {"type": d.type, "gpuUUID": d.gpu_uuid}
    if d.model:
        out["productName"] = d.model
    if d.mig_uuid:
        out["migUUID"] = d.mig_uuid
    if d.mig_profile:
        out["migProfile"] = d.mig_profile
    if d.gpu_instance_id is not None:
        out["gpuInstanceID"] = d.gpu_instance_id
    if d.compute_instance_id is not None:
        out["computeInstanceID"] = d.compute_instance_id
    if d.share_id:
        out["shareID"] = d.share_id
    if d.admin_access:
        out["adminAccess"] = True
    return out


class DeviceStatusWriter:
    """Owns this node's entries in prepared claims' ``status.devices``. A :class:`ClaimObserver`."""

    def __init__(self, kube: Kube, driver_name: str, node_name: str, *, now: Callable[[], str] = _now,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS):
        self._kube = kube
        self.driver_name = driver_name
        self.node_name = node_name
        self._now = now
        self._retry_delays = retry_delays
        self._claims: dict[str, ClaimView] = {}          # uid -> prepared claim
        self._names: dict[str, tuple[str, str]] = {}     # uid -> (namespace, name), also while clearing
        self._extra: dict[str, dict[str, Condition]] = {}  # uid -> claim-wide conditions (Idle)
        self._health: dict[str, _Health] = {}            # device name or GPU UUID -> health
        self._dirty: set[str] = set()
        self._workers: dict[str, asyncio.Task] = {}
        #: False once the API server showed it drops status.devices
        self.enabled = True
        self._forbidden_logged = False

    # -- observer ---------------------------------------------------------------------------------
    def prepared(self, claim: ClaimView) -> None:
        self._claims[claim.uid] = claim
        self._names[claim.uid] = (claim.namespace, claim.name)
        self._schedule(claim.uid)

    def unprepared(self, uid: str) -> None:
        if self._claims.pop(uid, None) is None and uid not in self._names:
            return
        self._extra.pop(uid, None)
        self._schedule(uid)

    # -- for the health monitor and the idle detector -----------------------------------------------
    def set_device_health(self, target: str, healthy: bool, reason: str = "", message: str = "") -> int:
        """Set the ``Healthy`` condition of every prepared device named ``target`` (a published device name)
        or on the GPU with UUID ``target`` (its whole, MIG and shared devices). ``reason`` is a condition
        reason (CamelCase, e.g. "XidCriticalError"); returns how many claims are rewritten."""
        self._health[target] = _Health(healthy, reason or (REASON_HEALTHY if healthy else "DeviceUnhealthy"),
                                       message)
        if healthy and not message:
            self._health.pop(target)          # back to the default: healthy
        hit = [uid for uid, c in self._claims.items()
               if any(target in (d.device, d.gpu_uuid, d.mig_uuid) for d in c.devices)]
        for uid in hit:
            self._schedule(uid)
        return len(hit)

    def set_claim_condition(self, uid: str, condition: Condition) -> bool:
        """A condition on every device entry of a prepared claim (the idle detector's ``Idle``); False when the
        claim is not prepared here."""
        if uid not in self._claims:
            return False
        conds = self._extra.setdefault(uid, {})
        if conds.get(condition.type) == condition:
            return True
        conds[condition.type] = condition
        self._schedule(uid)
        return True

    async def drain(self) -> None:
        """Wait until every wanted state is written (or given up); for tests and shutdown."""
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    async def close(self) -> None:
        for t in list(self._workers.values()):
            t.cancel()
        await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    # -- what is wanted ---------------------------------------------------------------------------
    def _health_of(self, d: DeviceView) -> _Health | None:
        for target in (d.device, d.mig_uuid, d.gpu_uuid):
            if target and target in self._health:
                return self._health[target]
        return None

    def _wanted(self, uid: str) -> list[tuple[DeviceView, list[Condition]]]:
        claim = self._claims.get(uid)
        if claim is None:
            return []
        out = []
        for d in claim.devices:
            if d.driver != self.driver_name or d.pool != self.node_name:
                continue
            h = self._health_of(d)
            conds = [Condition(CONDITION_READY, "True", REASON_PREPARED, f"prepared on node {self.node_name}"),
                     Condition(CONDITION_HEALTHY, "True" if h is None or h.healthy else "False",
                               h.reason if h else REASON_HEALTHY, h.message if h else "")]
            conds += list(self._extra.get(uid, {}).values())
            out.append((d, conds[:MAX_CONDITIONS]))
        return out

    def _entry(self, d: DeviceView, conds: list[Condition], old: dict | None, generation: int) -> dict:
        before = {c.get("type"): c for c in (old or {}).get("conditions") or [] if isinstance(c, dict)}
        conditions = []
        for c in conds:
            prev = before.get(c.type)
            since = prev.get("lastTransitionTime") if prev and prev.get("status") == c.status else None
            cond: dict[str, Any] = {"type": c.type, "status": c.status, "reason": c.reason,
                                    "message": bound(c.message, MAX_MESSAGE_BYTES),
                                    "lastTransitionTime": since or self._now()}
            if generation:
                cond["observedGeneration"] = generation
            conditions.append(cond)
        entry: dict[str, Any] = {"driver": d.driver, "pool": d.pool, "device": d.device, "conditions": conditions,
                                 "data": device_data(d)}
        if d.share_id:
            entry["shareID"] = d.share_id
        return entry

    def _mine(self, e: Any) -> bool:
        return isinstance(e, dict) and e.get("driver") == self.driver_name and e.get("pool") == self.node_name

    # -- writing ------------------------------------------------------------------------------------
    def _schedule(self, uid: str) -> None:
        if not self.enabled:
            return
        self._dirty.add(uid)
        if uid not in self._workers:
            try:
                task = asyncio.get_running_loop().create_task(self._work(uid), name=f"device-status-{uid}")
            except RuntimeError:         # no loop (a synchronous caller): written with the next scheduled write
                return
            self._workers[uid] = task

    async def _work(self, uid: str) -> None:
        try:
            while uid in self._dirty and self.enabled:
                self._dirty.discard(uid)
                await self._write_with_retries(uid)
        finally:
            self._workers.pop(uid, None)
            if uid not in self._claims and uid not in self._dirty:
                self._names.pop(uid, None)

    async def _write_with_retries(self, uid: str) -> None:
        ns, name = self._names[uid]
        for attempt, delay in enumerate((0.0,) + self._retry_delays):
            if delay:
                await asyncio.sleep(delay)
            try:
                await self._write(uid, ns, name)
                return
            except KubeError as e:
                if e.status == 403:
                    if not self._forbidden_logged:
                        log.error("claim %s/%s: not allowed to write its status.devices (%s); the plugin's "
                                  "ClusterRole needs update on resourceclaims/status and, on Kubernetes 1.36+, "
                                  "associated-node:update on resourceclaims/driver for its driver name (chart: "
                                  "templates/plugin-rbac.yaml)", ns, name, e.message,
                                  extra=fields(claim=f"{ns}/{name}", claim_uid=uid))
                        self._forbidden_logged = True
                    return
                if e.invalid or e.status == 400:
                    log.error("claim %s/%s: the API server refused its status.devices: %s", ns, name, e.message,
                              extra=fields(claim=f"{ns}/{name}", claim_uid=uid))
                    return
                problem = str(e)
            except OSError as e:
                problem = f"the API server is unreachable ({e})"
            if uid in self._dirty:       # a newer state is wanted: written by the next round
                return
            log.warning("claim %s/%s: writing status.devices failed (attempt %d): %s", ns, name, attempt + 1,
                        problem, extra=fields(claim=f"{ns}/{name}", claim_uid=uid))
        log.warning("claim %s/%s: gave up writing status.devices; the next change of the claim writes it again",
                    ns, name, extra=fields(claim=f"{ns}/{name}", claim_uid=uid))

    async def _write(self, uid: str, ns: str, name: str) -> None:
        for _ in range(MAX_CONFLICTS):
            try:
                claim = await self._kube.get(claim_path(ns, name))
            except KubeError as e:
                if e.not_found:
                    return                    # gone: nothing to write or clear
                raise
            if (claim.get("metadata") or {}).get("uid") != uid:
                return                        # a new claim of the same name: not ours
            status = claim.setdefault("status", {})
            old = [e for e in status.get("devices") or []]
            wanted = self._wanted(uid) if status.get("allocation") else []
            old_by_key = {(e.get("device"), e.get("shareID") or ""): e for e in old if self._mine(e)}
            generation = int((claim.get("metadata") or {}).get("generation") or 0)
            new = [e for e in old if not self._mine(e)]
            new += [self._entry(d, conds, old_by_key.get((d.device, d.share_id)), generation) for d, conds in wanted]
            if new == old:
                return
            if new:
                status["devices"] = new
            else:
                status.pop("devices", None)
            try:
                stored = await self._kube.replace(claim_path(ns, name, status=True), claim)
            except KubeError as e:
                if e.conflict:
                    continue
                if e.not_found:
                    return
                raise
            kept = [e for e in ((stored.get("status") or {}).get("devices") or []) if self._mine(e)]
            if wanted and not kept:
                self.enabled = False
                log.warning("the API server dropped status.devices from claim %s/%s: it does not serve KEP-4817 "
                            "device status (feature gate DRAResourceClaimDeviceStatus off, or Kubernetes older "
                            "than 1.33); the plugin stops writing it", ns, name)
            return
        raise KubeError(409, "Conflict", f"still conflicting after {MAX_CONFLICTS} attempts", "PUT",
                        claim_path(ns, name, status=True))
