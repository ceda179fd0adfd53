"""The opt-in idle policy (issue 14 item 4; docs/monitoring.md §3): act on pods whose GPU claims the node
reported idle.

The node's idle detector (driver/plugin/idle.py) writes the condition ``type: Idle, status: "True"`` on each of
an idle claim's ``status.devices`` entries and never acts. Here, in the controller (which sees pods, their
priorities and namespaces), a policy may act on such pods:

* off unless ``--idle-policy on`` (chart ``idlePolicy.enabled``); then per namespace (the Namespace label
  ``gpu.partita.dev/idle-policy: off|annotate|evict``) and per DeviceClass (``--idle-policy-classes
  CLASS=annotate,...``). The namespace label wins where it is set (``off`` opts a namespace out of a class
  policy); else a pod's claims take the mildest action of the classes their requests use (a class without an
  action: nothing);
* a pod is acted on only when it runs, its priority (``spec.priority``) is below ``priority_below``, every
  claim it uses is Partita's (a pod with another driver's claim is never touched), every allocated device of
  ours of each claim has ``Idle`` True, and the latest of those conditions turned True at least
  ``grace_seconds`` ago; pods of a gang or a Job are left alone unless ``include_gangs``;
* ``annotate``: the pod gets ``gpu.partita.dev/idle-since=<RFC3339>`` (when the node judged it idle) and a
  ``PartitaIdle`` Event; the annotation is removed (``PartitaIdleCleared``) once that no longer holds;
* ``evict``: the same annotation, then a ``PartitaIdleEvicted`` Event and the Eviction API (policy/v1
  ``pods/eviction``, so PodDisruptionBudgets are honoured); a 429 (a budget forbids it now) is tried again
  later with backoff, at most ``max_evictions_per_minute`` evictions in any minute;
* ``dry_run``: nothing is written but ``PartitaIdlePolicyDryRun`` Events and log lines saying what would be.

:func:`decide` is the pure decision (tested as a table); :class:`IdlePolicy` applies it to the controller's
cache every ``interval_seconds``.
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from driver.api.kube import Kube, KubeError
from driver.errors import PartitaError

from . import metrics
from driver.api.objects import device_class_names

from .claims import is_done, key, ownership, pod_claims
from .gang import JOB_NAME, GangError, gang_of
from .reservations import priority

log = logging.getLogger(__name__)

LABEL = "gpu.partita.dev/idle-policy"
ANNOTATION_IDLE_SINCE = "gpu.partita.dev/idle-since"
CONDITION_IDLE = "Idle"                  # driver/plugin/devicestatus.py's condition type (the node's verdict)
OFF, ANNOTATE, EVICT = "off", "annotate", "evict"
ACTIONS = (OFF, ANNOTATE, EVICT)
NONE = "none"                            # a decision to do nothing
REASON_IDLE = "PartitaIdle"
REASON_CLEARED = "PartitaIdleCleared"
REASON_EVICTED = "PartitaIdleEvicted"
REASON_BLOCKED = "PartitaIdleEvictionBlocked"
REASON_DRY_RUN = "PartitaIdlePolicyDryRun"
_STRENGTH = {OFF: 0, ANNOTATE: 1, EVICT: 2}


class IdlePolicyError(PartitaError, ValueError):
    """A setting of the idle policy is wrong (the message names the setting and the fix)."""


@dataclass(frozen=True)
class IdleSettings:
    #: the master switch: off, nothing is evaluated (namespace labels and classes are ignored)
    enabled: bool = False
    #: DeviceClass name -> annotate | evict
    classes: Mapping[str, str] = field(default_factory=dict)
    #: seconds the Idle condition must have been True beyond the node's own idle period
    grace_seconds: float = 300.0
    #: only pods with spec.priority below this are acted on (1: priority 0 and below)
    priority_below: int = 1
    #: evictions (dry-run ones included) in any 60 s, at most
    max_evictions_per_minute: int = 2
    #: report only: no annotation, no eviction
    dry_run: bool = False
    #: act on pods of gangs and Jobs too
    include_gangs: bool = False
    #: seconds between evaluations
    interval_seconds: float = 30.0

    def __post_init__(self) -> None:
        for cls, action in self.classes.items():
            if action not in (ANNOTATE, EVICT):
                raise IdlePolicyError(f"classes: DeviceClass {cls!r} has action {action!r}; use annotate or evict")
        if self.grace_seconds < 0:
            raise IdlePolicyError(f"grace: {self.grace_seconds} is negative; give seconds >= 0")
        if self.max_evictions_per_minute < 0:
            raise IdlePolicyError(f"max-evictions-per-minute: {self.max_evictions_per_minute} is negative; "
                                  "give 0 (no eviction) or more")
        if self.interval_seconds <= 0:
            raise IdlePolicyError(f"interval: {self.interval_seconds} must be > 0 seconds")


def parse_classes(text: str) -> dict[str, str]:
    """``CLASS=ACTION,CLASS=ACTION`` -> {class: action}; IdlePolicyError naming the bad item."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in (text or "").split(",")):
        if not item:
            continue
        cls, sep, action = (p.strip() for p in item.partition("="))
        if not sep or not cls or action not in (ANNOTATE, EVICT):
            raise IdlePolicyError(f"classes: {item!r} is not CLASS=annotate or CLASS=evict "
                                  f"(e.g. gpu.partita.dev=annotate)")
        if cls in out:
            raise IdlePolicyError(f"classes: DeviceClass {cls!r} is listed twice")
        out[cls] = action
    return out


@dataclass(frozen=True)
class Decision:
    action: str                   # none | annotate | evict
    why: str
    since: str = ""               # RFC3339: when the last of the pod's claims' devices turned idle
    source: str = ""              # what chose the action: the namespace label or the DeviceClass(es)
    claims: tuple[str, ...] = ()  # the pod's claims (namespace/name)


def _parse_time(stamp: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (AttributeError, ValueError):
        return None


def idle_since(claim: Mapping, driver: str) -> tuple[str | None, str]:
    """(the latest lastTransitionTime of the Idle=True conditions, "") when every allocated device of
    ``driver`` of the claim has Idle True in status.devices; else (None, why not)."""
    status = claim.get("status") or {}
    results = [r for r in (((status.get("allocation") or {}).get("devices") or {}).get("results") or [])
               if r.get("driver") == driver]
    if not results:
        return None, f"claim {key(claim)} has no allocated device of {driver}"
    entries = {(e.get("driver"), e.get("pool"), e.get("device"), e.get("shareID") or ""): e
               for e in status.get("devices") or []}
    latest: tuple[float, str] | None = None
    for r in results:
        e = entries.get((driver, r.get("pool"), r.get("device"), r.get("shareID") or ""))
        cond = next((c for c in (e or {}).get("conditions") or [] if c.get("type") == CONDITION_IDLE), None)
        if cond is None or cond.get("status") != "True":
            return None, f"device {r.get('pool')}/{r.get('device')} of claim {key(claim)} is not reported idle"
        stamp = str(cond.get("lastTransitionTime") or "")
        t = _parse_time(stamp)
        if t is None:
            return None, f"the Idle condition of device {r.get('device')} of claim {key(claim)} has no valid time"
        if latest is None or t > latest[0]:
            latest = (t, stamp)
    assert latest is not None
    return latest[1], ""


def namespace_action(labels: Mapping[str, str] | None) -> tuple[str | None, str]:
    """(the action the Namespace's label asks for, or None when it has none; an error message if invalid)."""
    value = (labels or {}).get(LABEL)
    if value is None:
        return None, ""
    if value not in ACTIONS:
        return OFF, f"label {LABEL}={value!r} is not one of {', '.join(ACTIONS)}; the namespace is left alone"
    return value, ""


def class_action(claims: Iterable[Mapping], classes: Mapping[str, str]) -> tuple[str, str]:
    """The mildest action over every request's DeviceClass of the claims (off when any class has none)."""
    names = sorted({n for c in claims for n in device_class_names(c)})
    if not names:
        return OFF, ""
    action = min((classes.get(n, OFF) for n in names), key=_STRENGTH.__getitem__)
    return action, "DeviceClass " + ", ".join(names)



def _in_gang(pod: Mapping) -> str:
    md = pod.get("metadata") or {}
    try:
        g = gang_of(pod)
    except GangError:
        return "its gang annotations are invalid"
    if g is not None:
        return f"it is a member of gang {g.key}"
    if (md.get("labels") or {}).get(JOB_NAME) or any(o.get("kind") == "Job" for o in md.get("ownerReferences") or []):
        return "it belongs to a Job"
    return ""


def decide(pod: Mapping, claims: list[Mapping | None], namespace_labels: Mapping[str, str] | None,
           settings: IdleSettings, driver: str, partita_classes: set[str], now: float) -> Decision:
    """What the policy does with ``pod`` now. ``claims``: the pod's claims in pod_claims order (None where
    the claim is not known)."""
    names = tuple(f"{(pod.get('metadata') or {}).get('namespace', '')}/{pc.claim_name}" for pc in pod_claims(pod))
    if not settings.enabled:
        return Decision(NONE, "the idle policy is off", claims=names)
    md, status = pod.get("metadata") or {}, pod.get("status") or {}
    if md.get("deletionTimestamp") or status.get("phase") != "Running":
        return Decision(NONE, "the pod is not running", claims=names)
    if not claims:
        return Decision(NONE, "the pod uses no ResourceClaim", claims=names)
    if any(c is None for c in claims):
        return Decision(NONE, "a claim of the pod is not known yet", claims=names)
    known = [c for c in claims if c is not None]
    for c in known:
        if not ownership(c, partita_classes).ours:
            return Decision(NONE, f"claim {key(c)} is not (only) {driver}'s: pods using other drivers' claims "
                                  "are never touched", claims=names)
    action, error = namespace_action(namespace_labels)
    source = f"namespace label {LABEL}"
    if error:
        return Decision(NONE, f"namespace {md.get('namespace')}: {error}", claims=names)
    if action is None:
        action, source = class_action(known, settings.classes)
    if action == OFF:
        return Decision(NONE, "no idle policy applies (no namespace label, no DeviceClass action)"
                        if source.startswith("DeviceClass") or not source else f"{source} is off", claims=names)
    prio = priority(pod)
    if prio >= settings.priority_below:
        return Decision(NONE, f"priority {prio} is not below {settings.priority_below}", source=source, claims=names)
    if not settings.include_gangs:
        why = _in_gang(pod)
        if why:
            return Decision(NONE, f"{why}; gangs and Jobs are left alone", source=source, claims=names)
    latest: tuple[float, str] | None = None
    for c in known:
        since, why = idle_since(c, driver)
        if since is None:
            return Decision(NONE, why, source=source, claims=names)
        t = _parse_time(since) or 0.0
        if latest is None or t > latest[0]:
            latest = (t, since)
    assert latest is not None
    idle_for = now - latest[0]
    if idle_for < settings.grace_seconds:
        return Decision(NONE, f"idle since {latest[1]} ({int(idle_for)}s), within the grace period of "
                              f"{int(settings.grace_seconds)}s", since=latest[1], source=source, claims=names)
    return Decision(action, f"every claim ({', '.join(names)}) idle since {latest[1]}, beyond the grace period of "
                            f"{int(settings.grace_seconds)}s; priority {prio}; {source}: {action}",
                    since=latest[1], source=source, claims=names)


def _count(action: str, result: str) -> None:
    metrics.IDLE_POLICY_ACTIONS.labels(action, result).inc()


class IdlePolicy:
    """Applies :func:`decide` to the controller's cache; every write passes the leader fence."""

    def __init__(self, settings: IdleSettings, driver: str, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.driver = driver
        self.clock = clock
        self.monotonic = monotonic
        self._last_run = -1e18
        self._evictions: collections.deque[float] = collections.deque()   # monotonic times, last 60 s
        self._retry_at: dict[str, float] = {}       # pod key -> not before (after a 429 or a failure)
        self._backoff: dict[str, float] = {}
        self._warned: set[str] = set()
        self._reported: set[tuple[str, str, str]] = set()   # (pod, action, since) reported in a dry run
        self.decisions: dict[str, Decision] = {}    # pod key -> its latest decision (for tests, explain)

    def due(self) -> bool:
        if not self.settings.enabled:
            return False
        now = self.monotonic()
        if now - self._last_run >= self.settings.interval_seconds:
            self._last_run = now
            return True
        return False

    def evaluate(self, cache) -> list[tuple[dict, Decision]]:  # noqa: ANN001 - the controller's Cache
        out = []
        partita = cache.partita_classes()
        now = self.clock()
        for pk in sorted(cache.pods):
            pod = cache.pods[pk]
            refs = pod_claims(pod)
            if not refs or is_done(pod):
                continue
            ns = pod["metadata"].get("namespace", "")
            claims = [cache.claim_by_name(ns, r.claim_name) if r.claim_name else None for r in refs]
            d = decide(pod, claims, cache.namespaces.get(ns), self.settings, self.driver, partita, now)
            if d.why.startswith(f"namespace {ns}: label") and ns not in self._warned:
                self._warned.add(ns)
                log.warning("%s (set it to off, annotate or evict)", d.why)
            out.append((pod, d))
        self.decisions = {key(p): d for p, d in out}
        self._reported = {r for r in self._reported if r[0] in self.decisions}
        for pk in [p for p in self._retry_at if p not in self.decisions]:
            self._retry_at.pop(pk, None)
            self._backoff.pop(pk, None)
        return out

    async def run(self, cache, kube: Kube, events, fence) -> None:  # noqa: ANN001 - Cache, EventRecorder, Fence
        for pod, d in self.evaluate(cache):
            annotated = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_IDLE_SINCE)
            want = d.since if d.action in (ANNOTATE, EVICT) else None
            if annotated != want and not (want is None and annotated is None):
                await self._annotate(pod, d, want, kube, events, fence)
            if d.action == EVICT:
                await self._evict(pod, d, kube, events, fence)

    async def _annotate(self, pod: dict, d: Decision, value: str | None, kube: Kube, events, fence) -> None:  # noqa: ANN001
        md = pod["metadata"]
        pk = key(pod)
        action = ANNOTATE if value is not None else "unannotate"
        if self.settings.dry_run:
            if (pk, action, value or "") in self._reported:
                return
            self._reported.add((pk, action, value or ""))
            _count(action, "dry_run")
            if value is not None:
                log.info("idle policy (dry run): would annotate pod %s %s=%s: %s", pk, ANNOTATION_IDLE_SINCE,
                         value, d.why)
                await events.post(pod, "Normal", REASON_DRY_RUN,
                                  f"dry run: would annotate {ANNOTATION_IDLE_SINCE}={value}: {d.why}")
            return
        fence.check(f"the idle annotation of pod {pk}")
        try:
            await kube.merge_patch(f"/api/v1/namespaces/{md.get('namespace')}/pods/{md.get('name')}",
                                   {"metadata": {"annotations": {ANNOTATION_IDLE_SINCE: value}}})
        except KubeError as e:
            if not e.not_found:
                _count(action, "error")
                log.warning("idle policy: could not %s pod %s: %s", action, pk, e)
            return
        _count(action, "done")
        if value is not None:
            log.info("idle policy: annotated pod %s %s=%s: %s", pk, ANNOTATION_IDLE_SINCE, value, d.why)
            await events.post(pod, "Normal", REASON_IDLE, f"annotated {ANNOTATION_IDLE_SINCE}={value}: {d.why}")
        else:
            log.info("idle policy: removed %s from pod %s: %s", ANNOTATION_IDLE_SINCE, pk, d.why)
            await events.post(pod, "Normal", REASON_CLEARED, f"removed {ANNOTATION_IDLE_SINCE}: {d.why}")

    def _rate_limited(self) -> bool:
        now = self.monotonic()
        while self._evictions and now - self._evictions[0] >= 60.0:
            self._evictions.popleft()
        return len(self._evictions) >= self.settings.max_evictions_per_minute

    def _retry_later(self, pk: str) -> float:
        delay = min(600.0, max(self.settings.interval_seconds, self._backoff.get(pk, 0.0) * 2 or 10.0))
        self._backoff[pk] = delay
        self._retry_at[pk] = self.monotonic() + delay
        return delay

    async def _evict(self, pod: dict, d: Decision, kube: Kube, events, fence) -> None:  # noqa: ANN001
        md = pod["metadata"]
        pk = key(pod)
        if self._retry_at.get(pk, 0.0) > self.monotonic():
            return
        if self._rate_limited():
            _count(EVICT, "rate_limited")
            log.info("idle policy: pod %s not evicted yet: %d eviction(s) in the last minute is the limit "
                     "(--idle-policy-max-evictions-per-minute)", pk, self.settings.max_evictions_per_minute)
            return
        if self.settings.dry_run:
            if (pk, EVICT, d.since) in self._reported:
                return
            self._reported.add((pk, EVICT, d.since))
            self._evictions.append(self.monotonic())
            _count(EVICT, "dry_run")
            log.info("idle policy (dry run): would evict pod %s: %s", pk, d.why)
            await events.post(pod, "Normal", REASON_DRY_RUN, f"dry run: would evict the pod: {d.why}")
            return
        await events.post(pod, "Warning", REASON_EVICTED, f"evicting the pod (Eviction API): {d.why}")
        fence.check(f"the eviction of pod {pk}")
        body = {"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": md.get("name"), "namespace": md.get("namespace")},
                "deleteOptions": {"preconditions": {"uid": md.get("uid")}} if md.get("uid") else {}}
        try:
            await kube.create(f"/api/v1/namespaces/{md.get('namespace')}/pods/{md.get('name')}/eviction", body)
        except KubeError as e:
            if e.not_found:
                _count(EVICT, "gone")
                return
            if e.status == 429:
                delay = self._retry_later(pk)
                _count(EVICT, "blocked")
                log.info("idle policy: eviction of pod %s refused for now (%s); trying again in %ds", pk,
                         e.message, int(delay))
                await events.post(pod, "Normal", REASON_BLOCKED,
                                  f"not evicted: {e.message} (a PodDisruptionBudget); trying again later")
                return
            delay = self._retry_later(pk)
            _count(EVICT, "error")
            log.warning("idle policy: could not evict pod %s: %s; trying again in %ds", pk, e, int(delay))
            return
        self._evictions.append(self.monotonic())
        self._retry_at.pop(pk, None)
        self._backoff.pop(pk, None)
        _count(EVICT, "done")
        log.info("idle policy: evicted pod %s: %s", pk, d.why)
