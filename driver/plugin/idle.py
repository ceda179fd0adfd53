"""Idle claims, node side (issue 14 item 4): a prepared claim whose devices stayed below ``--idle-threshold``
utilization for ``--idle-period`` seconds is reported, never evicted.

Reported three ways, the contract `partita status` and the dashboards read:

* the metric ``partita_claim_idle{node, claim_namespace, claim_name, pod_namespace, pod_name}``: 0 while the
  claim is prepared and not idle, 1 while idle; removed when the claim is unprepared;
* the condition ``type: Idle`` on each of the claim's entries in ``status.devices`` (driver/plugin/
  devicestatus.py): status "True" with reason "BelowThreshold" and a message with the figures (threshold,
  period, the highest utilization seen meanwhile); status "False" with reason "AboveThreshold" once a sample
  reaches the threshold again;
* an Event on each pod of the claim: reason ``GpuClaimIdle`` (type Normal), and ``GpuClaimActive`` when it
  is used again.

A claim's utilization is the highest of its devices' (driver/plugin/usage.py). A sample whose utilization
is unknown (a MIG device without GPM, shares whose processes cannot be attributed) decides nothing: such a
claim is never reported idle. Nothing here deletes, evicts or annotates a pod; the opt-in policy that acts on
idle claims is the controller's (controller/operator/idlepolicy.py, docs/monitoring.md §3).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Callable

from driver.api.kube import InvalidName, Kube, KubeError, namespaced_path
from driver.api.messages import bound
from driver.logfmt import fields
from driver.plugin import metrics
from driver.plugin.devicestatus import CONDITION_IDLE, Condition
from driver.plugin.observers import ClaimView

log = logging.getLogger(__name__)

REASON_IDLE = "BelowThreshold"
REASON_ACTIVE = "AboveThreshold"
EVENT_IDLE = "GpuClaimIdle"
EVENT_ACTIVE = "GpuClaimActive"
COMPONENT = "partita-plugin"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m or h else "") + f"{sec}s"


class PodEvents:
    """Posts core/v1 Events on pods in the background; failures are logged."""

    def __init__(self, kube: Kube, node_name: str):
        self._kube = kube
        self.node_name = node_name
        self._tasks: set[asyncio.Task] = set()
        self.posted: list[tuple[str, str, str]] = []     # (namespace/pod, reason, message), for tests

    def post(self, namespace: str, pod: str, uid: str, etype: str, reason: str, message: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{pod}.", "namespace": namespace},
                "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": namespace,
                                   "uid": uid},
                "reason": reason, "message": bound(message), "type": etype,
                "source": {"component": COMPONENT, "host": self.node_name}, "reportingComponent": COMPONENT,
                # core/v1 Event validation: reportingInstance at most 128 characters
                "reportingInstance": f"{COMPONENT}-{self.node_name}"[:128], "firstTimestamp": stamp,
                "lastTimestamp": stamp, "count": 1}
        self.posted.append((f"{namespace}/{pod}", reason, message))
        try:
            task = asyncio.get_running_loop().create_task(self._send(namespace, pod, reason, body))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, namespace: str, pod: str, reason: str, body: dict) -> None:
        try:
            await self._kube.create(namespaced_path("/api/v1", namespace, "events", kind="Event"), body)
        except (KubeError, InvalidName, OSError) as e:
            log.warning("could not post event %s on pod %s/%s: %s", reason, namespace, pod, e)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


@dataclass
class _State:
    claim: ClaimView
    below_since: float | None = None
    peak: float = 0.0
    idle: bool = False


class IdleDetector:
    def __init__(self, node_name: str, *, threshold: float, period: float, writer=None,  # noqa: ANN001
                 events: PodEvents | None = None, clock: Callable[[], float] = time.monotonic):
        if not 0 < threshold <= 1:
            raise ValueError(f"--idle-threshold {threshold}: must be a utilization ratio above 0 and at most 1 "
                             "(0.05 = 5 %)")
        if period <= 0:
            raise ValueError(f"--idle-period {period}: must be a positive number of seconds")
        self.node_name = node_name
        self.threshold = threshold
        self.period = period
        self.writer = writer                    # DeviceStatusWriter or None
        self.events = events
        self._clock = clock
        self._claims: dict[str, _State] = {}

    def _labels(self, claim: ClaimView) -> tuple[str, ...]:
        pod_ns, pod = claim.pods[0] if claim.pods else ("", "")
        return (self.node_name, claim.namespace, claim.name, pod_ns, pod)

    def prepared(self, claim: ClaimView) -> None:
        old = self._claims.get(claim.uid)
        if old is not None:                     # prepared again (another pod): same state, maybe new labels
            if self._labels(old.claim) != self._labels(claim):
                try:
                    metrics.CLAIM_IDLE.remove(*self._labels(old.claim))
                except KeyError:
                    pass
            old.claim = claim
            metrics.CLAIM_IDLE.labels(*self._labels(claim)).set(1 if old.idle else 0)
            return
        self._claims[claim.uid] = _State(claim)
        metrics.CLAIM_IDLE.labels(*self._labels(claim)).set(0)

    def unprepared(self, uid: str) -> None:
        st = self._claims.pop(uid, None)
        if st is not None:
            try:
                metrics.CLAIM_IDLE.remove(*self._labels(st.claim))
            except KeyError:
                pass

    def is_idle(self, uid: str) -> bool:
        st = self._claims.get(uid)
        return bool(st and st.idle)

    def observe(self, uid: str, utilization: float | None) -> None:
        st = self._claims.get(uid)
        if st is None or utilization is None:
            return
        now = self._clock()
        if utilization < self.threshold:
            if st.below_since is None:
                st.below_since, st.peak = now, utilization
            st.peak = max(st.peak, utilization)
            if not st.idle and now - st.below_since >= self.period:
                self._transition(st, True, now)
        else:
            st.below_since = None
            if st.idle:
                self._transition(st, False, now, utilization)

    def _transition(self, st: _State, idle: bool, now: float, utilization: float = 0.0) -> None:
        st.idle = idle
        c = st.claim
        if idle:
            message = (f"GPU utilization of claim {c} stayed below {self.threshold:.0%} for "
                       f"{_duration(now - (st.below_since or now))} (threshold period {_duration(self.period)}; "
                       f"highest {st.peak:.1%}) on node {self.node_name}")
            cond = Condition(CONDITION_IDLE, "True", REASON_IDLE, message)
        else:
            message = (f"GPU utilization of claim {c} is {utilization:.1%}, at or above the idle threshold "
                       f"{self.threshold:.0%}, on node {self.node_name}")
            cond = Condition(CONDITION_IDLE, "False", REASON_ACTIVE, message)
        log.info("claim %s (uid %s): %s", c, c.uid, message,
                 extra=fields(claim=str(c), claim_uid=c.uid, pod="/".join(c.pods[0]) if c.pods else None))
        metrics.CLAIM_IDLE.labels(*self._labels(c)).set(1 if idle else 0)
        if self.writer is not None:
            self.writer.set_claim_condition(c.uid, cond)
        if self.events is not None:
            for (ns, pod), pod_uid in zip(c.pods, c.pod_uids):
                self.events.post(ns, pod, pod_uid, "Normal", EVENT_IDLE if idle else EVENT_ACTIVE, message)
