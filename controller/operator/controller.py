"""The controller's decisions: allocate pending pods' Partita claims, release allocations nobody uses.

Everything runs in one worker (allocations never race each other inside one controller; leader election
keeps it to one controller). Events from the watches update the cache and queue keys; failed attempts
are retried with backoff and whenever something relevant changes.

The worker starts deciding only once every informer has applied its first list (a decision on half a
list can hand out a device another claim holds), and every write passes the leader fence
(``self.fence``): when the lease is lost the write is not sent and the worker stops at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

from controller.allocator import AllocatedState, AllocationError, Allocator, Features, copy_claim_with_tolerations
from controller.allocator.nodeselector import node_matches
from controller.queuepolicy import Plan, QueueSettings, Waiting, plan as queue_plan
from driver.api import constants as C
from driver.api.config import validate_claim_configs
from driver.api.kube import Kube, KubeError, claim_path
from driver.api.messages import bound_list

from . import metrics
from .cache import Cache
from .capacity import CapacityGauges
from .claims import allocated_node, is_done, is_pending, key, ownership, pod_claims
from .events import EventRecorder
from .healthevents import HealthReporter
from .idlepolicy import IdlePolicy, IdleSettings
from .extendedresources import DEFAULT_NAMES, REASON as EXTENDED_RESOURCE_REASON, ExtendedResourceAdvisor
from .gang import WORKLOAD_API, GangError, GangRef, gang_of, members, workload_gang_size
from .leader import NO_FENCE, Fence, NotLeader
from .nodefit import NodeInfo, Topology, fit
from .outcome import AGAIN, BACKOFF, DONE, WAIT, Outcome
from .queue import WorkQueue
from .reservations import GpuLayout, gpus_needed, priority
from .taintrules import noexecute_hits
from .writer import ANNOTATION_NODE, ANNOTATION_POD, Lost, release, remove_finalizer, write_allocation

log = logging.getLogger(__name__)


@dataclass
class ControllerConfig:
    driver_name: str = C.DEFAULT_DRIVER_NAME
    allocation_mode: str = C.ALLOCATION_MODE_CONTROLLER
    strategy: str = "pack"
    features: Features = field(default_factory=Features)
    #: give up on a node after this many search steps for one pod's claims (the search is exhaustive, as
    #: upstream's; a pathological claim must not stall the controller): that node counts as not fitting
    max_search_steps: int = 200_000
    retry_min: float = 1.0
    retry_max: float = 60.0
    rejection_seconds: float = 300.0
    #: a pod is reported unschedulable only once it has failed for this long: right after start (or right
    #: after a node joins) the watches deliver slices, nodes and pods in no particular order
    report_after: float = 2.0
    #: every informer lists again this often (the list replaces its cache: converges whatever was missed)
    resync_seconds: float = 300.0
    #: the capacity gauges (capacity.py) are recomputed at most this often, seconds
    capacity_refresh_seconds: float = 15.0
    #: leader election (client-go's defaults): lease duration > renew deadline > retry period, seconds
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    #: extended resources (the NVIDIA device plugin's) whose pending pods are told to use a ResourceClaim
    extended_resource_names: tuple[str, ...] = DEFAULT_NAMES
    #: the queue policy (controller/queuepolicy.py): reservations for pods waiting reserve_after seconds
    queue: QueueSettings = field(default_factory=QueueSettings)
    #: the opt-in idle policy (controller/operator/idlepolicy.py): off by default
    idle: IdleSettings = field(default_factory=IdleSettings)


def _held(claim: Mapping | None) -> bool:
    return bool(((claim or {}).get("status") or {}).get("allocation"))


class Controller:
    def __init__(self, cfg: ControllerConfig, kube: Kube):
        self.cfg = cfg
        self.kube = kube
        self.cache = Cache(cfg.driver_name)
        self.allocator = Allocator(cfg.features, cfg.strategy, max_steps=cfg.max_search_steps)
        self.events = EventRecorder(kube)
        self.health = HealthReporter(cfg.driver_name)      # events on pods whose devices turned unhealthy
        self.idle = IdlePolicy(cfg.idle, cfg.driver_name)  # acts on pods of idle claims where opted in
        self.extended = ExtendedResourceAdvisor(cfg.driver_name, cfg.allocation_mode, cfg.extended_resource_names)
        #: pod key -> the order the controller first saw it: the tie-break after priority and creationTimestamp
        #: (one-second resolution), so pods created in one second are tried in the order they came
        self._arrival: dict[str, int] = {}
        self._arrivals = itertools.count()
        self.queue = WorkQueue(cfg.retry_min, cfg.retry_max, rank=self._rank)
        self._nominated: dict[str, str] = {}                 # pod key -> node we allocated its claims for
        self._rejected: dict[str, dict[str, float]] = {}     # pod key -> node -> until (PostFilter feedback)
        self._failing_since: dict[str, float] = {}           # pod key -> first failed attempt (monotonic)
        self._needs: dict[str, int] = {}                     # pod key -> GPUs its claims need on one node
        self._announced: dict[str, str] = {}                 # pod key -> node its reservation was announced on
        self._gpus = GpuLayout()
        self.why_pending: dict[str, str] = {}                # pod key -> why its last attempt failed
        self.synced = False
        self.attempts = 0
        self.fence: Fence = NO_FENCE        # the leader elector when leader election is on
        self.informers = None               # set by run_controller: Informers (per-resource synced)
        self.lost = False                   # a write was refused for want of leadership: the worker stopped

    # -- inputs ---------------------------------------------------------------------------------
    def on_event(self, kind: str, etype: str, obj: dict) -> None:
        freed = kind == "claim" and _held(self.cache.claims.get(key(obj))) and (etype == "DELETED" or not _held(obj))
        vanished = self.cache.apply(kind, etype, obj)
        if kind == "pod":
            k = key(obj)
            if etype != "DELETED" and is_pending(obj):
                self.enqueue(f"pod:{k}")
            else:
                self._forget(k)
                self.extended.forget(obj)
                for pc in pod_claims(obj):
                    if pc.claim_name:
                        self.enqueue(f"claim:{obj['metadata'].get('namespace', '')}/{pc.claim_name}")
        elif kind == "claim":
            k = key(obj)
            self.enqueue(f"claim:{k}")
            for pod in self.cache.claim_users.get(k, ()):
                self.enqueue(f"pod:{pod}")
            if freed:
                self.enqueue_pending()     # devices were freed: every pending pod, in the policy's order
        else:   # slices, nodes, classes, taint rules: anything pending may fit now
            if kind == "slice" and self.health.on_slice(etype, obj):
                self.enqueue("health:")
            if kind == "devicetaintrule" and etype != "DELETED":
                self.enqueue(f"taint:{obj['metadata']['name']}")
            self.enqueue_pending()
        for v in vanished:
            # an allocation of ours the cache saw cleared (kube-scheduler's PostFilter): avoid that node
            self._reject(v.pod, v.node)
            self.enqueue(f"pod:{v.pod}")

    def _forget(self, pod_key: str) -> None:
        self._nominated.pop(pod_key, None)
        self._rejected.pop(pod_key, None)
        self._failing_since.pop(pod_key, None)
        self._needs.pop(pod_key, None)
        self._announced.pop(pod_key, None)
        self._arrival.pop(pod_key, None)

    def enqueue(self, k: str) -> None:
        self.queue.add(k)

    def enqueue_pending(self) -> None:
        for k, pod in self.cache.pods.items():
            if is_pending(pod):
                self.queue.add_now(f"pod:{k}")

    def _rank(self, k: str) -> tuple:
        """Releases and reports first (they free devices), then pods by the queue policy's order: higher
        priority, then older; pods created in the same second (creationTimestamp's resolution) in the order the
        controller first saw them, whenever and however often each was queued since."""
        if not k.startswith("pod:"):
            return (0,)
        pod = self.cache.pods.get(k[4:]) or {}
        arrival = self._arrival.setdefault(k[4:], next(self._arrivals))
        return (1, -priority(pod), (pod.get("metadata") or {}).get("creationTimestamp") or "", arrival)

    # -- loop -----------------------------------------------------------------------------------
    def informers_synced(self) -> bool:
        return self.informers is not None and self.informers.synced

    async def _wait_synced(self, stop: asyncio.Event) -> bool:
        while not self.informers_synced():
            if stop.is_set():
                return False
            waiter = asyncio.create_task(self.informers.wait_synced()) if self.informers is not None else \
                asyncio.create_task(asyncio.sleep(0.05))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for t in (waiter, stopper):
                t.cancel()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        if not await self._wait_synced(stop):
            return
        ticker = asyncio.create_task(self._tick(stop))
        try:
            while not stop.is_set():
                getter = asyncio.create_task(self.queue.get())
                stopper = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for t in (getter, stopper):
                    if t not in done:
                        t.cancel()
                if getter not in done:
                    break
                k = getter.result()
                try:
                    self.fence.check(f"anything for {k}")      # lost the lease: stop at once
                    if k.startswith("pod:"):
                        outcome = await self.reconcile_pod(k[4:])
                    elif k.startswith("taint:"):
                        outcome = await self.report_noexecute(k[6:])
                    elif k == "health:":
                        await self.health.report(self.cache, self.events)
                        outcome = Outcome()
                    elif k == "idle:":
                        await self.idle.run(self.cache, self.kube, self.events, self.fence)
                        outcome = Outcome()
                    else:
                        outcome = await self.reconcile_claim(k[6:])
                    await self._settle(k, outcome)
                except NotLeader as e:
                    log.error("stopping the worker: %s", e)
                    self.lost = True
                    break
                except KubeError as e:     # the API server refused or failed (5xx, 429, ...): retried
                    log.warning("reconciling %s failed: %s; retrying with backoff", k, e)
                    self.queue.backoff(k)
                except Exception:  # noqa: BLE001 - one bad object must not stop the controller
                    log.exception("reconciling %s failed", k)
                    self.queue.backoff(k)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def _settle(self, k: str, outcome: Outcome) -> None:
        """The one place a reconcile's outcome is acted on: metrics, Events, the key's next turn."""
        if outcome.conflict:
            metrics.CONFLICTS.inc()
        if outcome.result is not None:
            metrics.ALLOCATIONS.labels(outcome.result).inc()
        if outcome.seconds is not None:
            metrics.ALLOCATION_SECONDS.observe(outcome.seconds)
        for n in outcome.notes:
            await self.events.post(n.obj, n.type, n.reason, n.message)
        if outcome.next == DONE:
            self.queue.done(k)
        elif outcome.next == BACKOFF:
            self.queue.backoff(k, at_least=outcome.at_least)
        elif outcome.next == AGAIN:
            self.queue.add(k)

    async def _tick(self, stop: asyncio.Event) -> None:
        gauges = CapacityGauges(self.cfg.driver_name, self.cfg.capacity_refresh_seconds)
        while not stop.is_set():
            await asyncio.sleep(0.5)
            self.queue.due()
            self.cache.expire_inflight()
            metrics.POOLS_MISSING_TAINT.set(len(self.cache.tainted_pools_missing))
            gauges.refresh_controller(self)
            if self.idle.due():
                self.enqueue("idle:")

    def _reject(self, pod_key: str, node: str) -> None:
        metrics.VANISHED.inc()
        log.warning("the allocation for pod %s on node %s vanished (kube-scheduler found the node unfit); "
                    "choosing another node", pod_key, node)
        self._rejected.setdefault(pod_key, {})[node] = time.monotonic() + self.cfg.rejection_seconds

    # -- allocation -----------------------------------------------------------------------------
    async def reconcile_pod(self, pod_key: str) -> Outcome:
        pod = self.cache.pods.get(pod_key)
        if pod is None or not is_pending(pod):
            return Outcome(DONE)
        out = Outcome()
        advice_pending = self._advise_extended_resources(pod, pod_key, out)
        got = self._claims_to_allocate(pod, out)
        if got is None:
            out.next = BACKOFF
            return out
        todo, allocated_claims = got
        metrics.PENDING_CLAIMS.set(sum(1 for p in self.cache.pods.values() if is_pending(p)))
        if not todo:
            out.next = BACKOFF if advice_pending and not pod_claims(pod) else DONE
            return out
        errors = self._config_errors(todo)
        if errors:
            self.why_pending[pod_key] = bound_list(errors)
            out.next = BACKOFF
            return out.note(pod, "Warning", "PartitaInvalidConfig", self.why_pending[pod_key])
        if self.cfg.allocation_mode != C.ALLOCATION_MODE_CONTROLLER:
            out.next = DONE   # scheduler mode: kube-scheduler allocates; we only validate
            return out
        try:
            gang = gang_of(pod)
        except GangError as e:
            self.why_pending[pod_key] = str(e)
            out.next = BACKOFF
            return out.note(pod, "Warning", "PartitaInvalidGang", str(e))
        if gang is not None:
            return await self._allocate_gang(pod, pod_key, gang, out)
        return await self._allocate(pod, pod_key, todo, allocated_claims, out)

    def _claims_to_allocate(self, pod: dict, out: Outcome) -> tuple[list[dict], list[dict]] | None:
        """(Partita claims of the pod to allocate, its claims already allocated); None while some claim is
        not there yet (a template's claim not created, or not in the cache)."""
        ns = pod["metadata"].get("namespace", "")
        refs = pod_claims(pod)
        if any(r.claim_name is None for r in refs):
            return None           # the resourceclaim controller has not created a template's claim yet
        claims = [self.cache.claim_by_name(ns, r.claim_name or "") for r in refs]
        if any(c is None for c in claims):
            return None
        partita = self.cache.partita_classes()
        ours = []
        for c in claims:
            own = ownership(c, partita)
            if own.mixed:
                out.note(pod, "Warning", "PartitaMixedClaim",
                         f"claim {key(c)} mixes Partita device classes with other drivers' classes; "
                         "in controller mode neither Partita nor kube-scheduler can allocate it — "
                         "split it into one claim per driver")
            if own.ours:
                ours.append(c)
        todo = [c for c in ours if not (c.get("status") or {}).get("allocation")
                and c["metadata"].get("uid") not in self.cache.inflight]
        return todo, [c for c in claims if (c.get("status") or {}).get("allocation")]

    def _config_errors(self, todo: list[dict]) -> list[str]:
        errors = []
        for c in todo:
            errors += validate_claim_configs(c.get("spec") or {}, self.cfg.driver_name, f"claim {key(c)} spec.devices")
        return errors

    def _advise_extended_resources(self, pod: dict, pod_key: str, out: Outcome) -> bool:
        """A pod asking for nvidia.com/gpu (the device plugin's) that nothing serves: say once what to do.
        True while that is not yet due (the pod must be looked at again)."""
        before = self.extended.given(pod)
        advice = self.extended.check(pod, self.cache.nodes.values(), self.cache.classes, self.cache.partita_classes(),
                                     serves_gpus=len(self.cache.slices) > 0 or bool(self.cache.scheduler_mode_pools),
                                     now=time.monotonic(), delay=self.cfg.report_after)
        if advice is None:
            if before is not None and self.why_pending.get(pod_key) == before:
                del self.why_pending[pod_key]        # served now (a device-plugin node joined)
            return False
        if not advice.due:
            return True
        if self.why_pending.get(pod_key, before) == before:     # never over another reason (a failed allocation)
            self.why_pending[pod_key] = advice.reason
        if advice.first:
            out.note(pod, "Warning", EXTENDED_RESOURCE_REASON, advice.message)
        return False

    def _candidates(self, pod: Mapping, pod_key: str, allocated_claims: list[dict],
                    extra: Mapping[str, list[dict]] | None = None) -> tuple[list[NodeInfo], dict[str, str]]:
        """Nodes the pod fits on (node fit, PostFilter feedback, its claims allocated elsewhere), and why
        not for the others. ``extra``: pods (per node) counted as placed there besides the cache's."""
        reasons: dict[str, str] = {}
        now = time.monotonic()
        rejected = {n: t for n, t in self._rejected.get(pod_key, {}).items() if t > now}
        infos = []
        for name, node in sorted(self.cache.nodes.items()):
            pods = self.cache.pods_on(name)
            pods += [self.cache.pods[p] for p, n in self._nominated.items()
                     if n == name and p != pod_key and p in self.cache.pods and is_pending(self.cache.pods[p])]
            pods += list((extra or {}).get(name, ()))
            infos.append(NodeInfo(node, pods))
        topo = Topology(infos, self.cache.namespaces)
        out = []
        for info in infos:
            if info.name in rejected:
                reasons[info.name] = "kube-scheduler rejected this node for the pod (its allocation here was cleared)"
                continue
            for c in allocated_claims:
                sel = ((c.get("status") or {}).get("allocation") or {}).get("nodeSelector")
                if sel and not node_matches(info.as_node(), sel):
                    reasons[info.name] = f"claim {key(c)} is allocated on another node"
                    break
            else:
                why = fit(pod, info, topo)
                if why:
                    reasons[info.name] = why
                else:
                    out.append(info)
        return out, reasons

    # -- the queue policy ------------------------------------------------------------------------
    def _plan(self, out: Outcome) -> Plan | None:
        """Reservations for the pods that waited long enough (None: nobody did, or they are off). A new
        reservation is announced on its pod."""
        settings = self.cfg.queue
        if settings.max_reservations == 0 or not self._failing_since:
            return None
        now = time.monotonic()
        waiting = []
        for pk, since in self._failing_since.items():
            pod = self.cache.pods.get(pk)
            if pod is not None and is_pending(pod):
                waiting.append(Waiting(pk, since, priority(pod), self._needs.get(pk, 1)))
        if not any(now - w.since >= settings.reserve_after and w.gpus >= settings.reserve_min for w in waiting):
            self._announced.clear()
            return None             # nobody to reserve for: the GPUs are not even looked at
        p = queue_plan(waiting, now, self._gpus.slots(self.cache.slices, self.cache.allocated), settings)
        for r in p.reservations:
            if self._announced.get(r.owner.key) != r.node:
                self._announced[r.owner.key] = r.node
                owner = self.cache.pods.get(r.owner.key)
                message = (f"{r.describe(now)}: other pods are not given these GPUs until it starts (nothing is "
                           f"backfilled: run times are unknown)")
                log.info("%s", message)
                if owner is not None:
                    out.note(owner, "Normal", "PartitaReserved", message)
        return p

    def _withheld(self, p: Plan | None, pod: Mapping, pod_key: str) -> tuple[set, list[str]]:
        """Devices of GPUs reserved for other pods, and the reasons to show when the pod does not fit."""
        if p is None:
            return set(), []
        item = Waiting(pod_key, self._failing_since.get(pod_key, time.monotonic()), priority(pod),
                       self._needs.get(pod_key, 1))
        blocking = p.blocking(item)
        devices = self._gpus.devices(g.id for r in blocking for g in r.gpus)
        return devices, [f"{len(r.gpus)} GPU(s) on {r.node} are reserved for {r.owner.key} (waiting "
                         f"{int(p.now - r.owner.since)}s)" for r in blocking]

    def _unavailable(self, todo: list[dict], withheld: set) -> set:
        """What the allocator may not use for these claims: GPUs serving another sharing strategy, GPUs
        reserved for another pod."""
        return self.cache.share_modes.unavailable(todo, self.cache.classes) | withheld

    async def _allocate(self, pod: dict, pod_key: str, todo: list[dict], allocated_claims: list[dict],
                        out: Outcome) -> Outcome:
        start = time.perf_counter()
        self.attempts += 1
        self._needs[pod_key] = gpus_needed(todo)
        candidates, reasons = self._candidates(pod, pod_key, allocated_claims)
        inputs = [copy_claim_with_tolerations(c, [C.managed_toleration()]) for c in todo]
        withheld, reserved_reasons = self._withheld(self._plan(out), pod, pod_key)
        try:
            choice = self.allocator.allocate_on_nodes([n.as_node() for n in candidates], inputs,
                                                      self.cache.slices, self.cache.classes, self.cache.allocated,
                                                      unavailable=self._unavailable(todo, withheld))
        except AllocationError as e:
            self.why_pending[pod_key] = str(e)
            out.result, out.next, out.at_least = "error", BACKOFF, self.cfg.retry_max / 4   # bad input: slowly
            return out.note(pod, "Warning", "PartitaAllocationError", str(e))
        if choice.node is None:
            reasons.update(choice.unsatisfiable_reasons)
            return self._unschedulable(pod, pod_key, self._explain(todo, reasons), todo, reserved_reasons, out)
        node = choice.node.name
        written = await self._write(pod_key, node, list(zip(todo, choice.results or [])), out)
        if not written:
            return out
        self._placed(pod_key, node)
        out.result, out.next, out.seconds = "allocated", DONE, time.perf_counter() - start
        devices = ", ".join(r["device"] for res in choice.results or [] for r in res["devices"]["results"])
        log.info("allocated %s for pod %s on node %s", devices, pod_key, node)
        return out.note(pod, "Normal", "PartitaAllocated", f"allocated {devices} on node {node}")

    def _unschedulable(self, pod: dict, pod_key: str, why: str, todo: list[dict], reserved: list[str],
                       out: Outcome, reason: str = "PartitaUnschedulable") -> Outcome:
        out.result = "unschedulable"
        self.why_pending[pod_key] = "; ".join([why] + reserved + self.cache.taint_rules.untolerated(todo))
        first = self._failing_since.setdefault(pod_key, time.monotonic())
        out.next = BACKOFF
        if time.monotonic() - first >= self.cfg.report_after:
            out.note(pod, "Warning", reason, self.why_pending[pod_key])
        else:
            out.at_least = self.cfg.report_after
        return out

    def _placed(self, pod_key: str, node: str) -> None:
        self._nominated[pod_key] = node
        self._failing_since.pop(pod_key, None)
        self._announced.pop(pod_key, None)
        self.why_pending.pop(pod_key, None)

    async def _write(self, pod_key: str, node: str, results: list[tuple[dict, dict]], out: Outcome) -> bool:
        """Write the allocations; False when interrupted (``out`` says what next)."""
        try:
            for claim, result in results:
                stored = await write_allocation(self.kube, claim, result, pod_key, node, self.fence)
                self.cache.record_write(stored, (stored.get("status") or {}).get("allocation") or result,
                                        int(stored["metadata"].get("resourceVersion") or 0), node, pod_key)
        except Lost as e:
            log.info("allocation for pod %s interrupted: %s; retrying", pod_key, e)
            out.result, out.next = "conflict", AGAIN
            return False
        except KubeError as e:
            if e.conflict:
                # the claim changed since the cache showed it: decide again once the watch has the change
                out.result, out.next, out.conflict = "conflict", BACKOFF, True
                return False
            raise
        return True

    # -- gangs ----------------------------------------------------------------------------------
    async def _gang_size(self, gang: GangRef) -> int | None:
        if gang.size is not None:
            return gang.size
        try:
            workload = await self.kube.get(f"{WORKLOAD_API}/namespaces/{gang.namespace}/workloads/{gang.workload}")
        except KubeError as e:
            if e.not_found:
                raise GangError(f"Workload {gang.namespace}/{gang.workload} does not exist: the pod waits until it "
                                "is created") from None
            raise
        return workload_gang_size(workload, gang)

    async def _allocate_gang(self, pod: dict, pod_key: str, gang: GangRef, out: Outcome) -> Outcome:
        """Every member's claims on a trial state first; written only when all fit (docs/gangs.md)."""
        start = time.perf_counter()
        try:
            size = await self._gang_size(gang)
        except GangError as e:
            self.why_pending[pod_key] = str(e)
            out.next = BACKOFF
            return out.note(pod, "Warning", "PartitaGangWaiting", str(e))
        if size is None:      # a Workload pod group with the basic policy: no gang
            got = self._claims_to_allocate(pod, Outcome())
            return await self._allocate(pod, pod_key, *(got or ([], [])), out)
        group = members(gang, self.cache.pods.values())
        if len(group) < size:
            message = (f"gang {gang.key}: {len(group)} of {size} pods exist; nothing is allocated until all "
                       f"{size} do")
            for m in group:
                self.why_pending[key(m)] = message
            out.next, out.at_least = BACKOFF, self.cfg.report_after
            return out.note(pod, "Normal", "PartitaGangWaiting", message)
        trial = self.cache.allocated.copy()
        extra: dict[str, list[dict]] = {}
        plan_now = self._plan(out)
        placed: list[tuple[dict, str, list[tuple[dict, dict]]]] = []
        used_nodes: list[str] = []
        self.attempts += 1
        for m in group:
            mk = key(m)
            got = self._claims_to_allocate(m, out)
            if got is None:
                out.next = BACKOFF
                self.why_pending[pod_key] = f"gang {gang.key}: the claims of pod {mk} are not created yet"
                return out
            todo, allocated_claims = got
            if not todo:
                node = self._nominated.get(mk)
                if node:
                    used_nodes.append(node)
                continue
            errors = self._config_errors(todo)
            if errors:
                self.why_pending[pod_key] = f"gang {gang.key}: pod {mk}: {bound_list(errors)}"
                out.next = BACKOFF
                return out.note(pod, "Warning", "PartitaInvalidConfig", self.why_pending[pod_key])
            self._needs[mk] = gpus_needed(todo)
            candidates, reasons = self._candidates(m, mk, allocated_claims, extra)
            withheld, reserved_reasons = self._withheld(plan_now, m, mk)
            inputs = [copy_claim_with_tolerations(c, [C.managed_toleration()]) for c in todo]
            nodes = [n.as_node() for n in candidates]
            same = [n for n in nodes if n.name in used_nodes[:1]]
            try:
                choice = None
                if used_nodes and (same or gang.same_node):
                    choice = self.allocator.allocate_on_nodes(same, inputs, self.cache.slices, self.cache.classes,
                                                              trial, unavailable=self._unavailable(todo, withheld))
                if (choice is None or choice.node is None) and not (used_nodes and gang.same_node):
                    choice = self.allocator.allocate_on_nodes(nodes, inputs, self.cache.slices, self.cache.classes,
                                                              trial, unavailable=self._unavailable(todo, withheld))
            except AllocationError as e:
                self.why_pending[pod_key] = f"gang {gang.key}: pod {mk}: {e}"
                out.result, out.next, out.at_least = "error", BACKOFF, self.cfg.retry_max / 4
                return out.note(pod, "Warning", "PartitaAllocationError", self.why_pending[pod_key])
            if choice is None or choice.node is None:
                reasons.update(choice.unsatisfiable_reasons if choice is not None else {})
                where = f" on {used_nodes[0]} (gang-topology node)" if used_nodes and gang.same_node else ""
                why = (f"gang {gang.key}: pod {mk} does not fit{where} beside the {len(placed)} member(s) placed "
                       f"before it, so none of its {size} pods is given devices: {self._explain(todo, reasons)}")
                for other in group:
                    self._failing_since.setdefault(key(other), time.monotonic())
                return self._unschedulable(pod, pod_key, why, todo, reserved_reasons, out)
            for res in choice.results or []:
                trial.add_allocation(res)
            node = choice.node.name
            used_nodes.append(node)
            extra.setdefault(node, []).append(m)
            placed.append((m, node, list(zip(todo, choice.results or []))))
        for m, node, results in placed:
            if not await self._write(key(m), node, results, out):
                return out        # the members written keep their allocations: the retry places the rest
            self._placed(key(m), node)
        out.result, out.next, out.seconds = "allocated", DONE, time.perf_counter() - start
        nodes = sorted({n for _, n, _ in placed})
        message = f"gang {gang.key}: allocated all {size} pods on {', '.join(nodes) or 'their nodes'}"
        log.info("%s", message)
        for m, _, _ in placed:
            out.note(m, "Normal", "PartitaAllocated", message)
        return out

    def _explain(self, claims: list[dict], reasons: Mapping[str, str]) -> str:
        names = ", ".join(key(c) for c in claims)
        if not self.cache.nodes:
            return f"claims {names}: no nodes"
        if not reasons:
            return f"claims {names}: no node has matching free devices"
        by_reason: dict[str, list[str]] = {}
        for node, why in sorted(reasons.items()):
            by_reason.setdefault(why, []).append(node)
        parts = []
        for why, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
            parts.append(f"{why} ({shown})")
        return f"cannot allocate claim(s) {names}: " + "; ".join(parts)

    async def report_noexecute(self, rule_name: str) -> Outcome:
        """A NoExecute DeviceTaintRule: an Event on each pod using a device it taints without tolerating it
        (kube-controller-manager's device-taint eviction evicts them; the controller only reports)."""
        out = Outcome(DONE)
        rule = self.cache.taint_rules.rules.rules.get(rule_name)
        if rule is None:
            return out
        for hit in noexecute_hits(self.cache.taint_rules, rule, self.cache.claims.values()):
            for pod_key in sorted(self.cache.claim_users.get(key(hit.claim), ())):
                pod = self.cache.pods.get(pod_key)
                if pod is not None and not is_done(pod):
                    out.note(pod, "Warning", "PartitaDeviceTaintNoExecute",
                             f"device {hit.device} of claim {key(hit.claim)} is tainted {hit.taint} by "
                             f"DeviceTaintRule {hit.rule}; pods that do not tolerate it are evicted "
                             "(add a toleration to the claim's request to keep running)")
        return out

    # -- release --------------------------------------------------------------------------------
    async def reconcile_claim(self, claim_key: str) -> Outcome:
        claim = self.cache.claims.get(claim_key)
        if claim is None or C.CLAIM_FINALIZER not in (claim["metadata"].get("finalizers") or []):
            return Outcome(DONE)
        status = claim.get("status") or {}
        annotations = claim["metadata"].get("annotations") or {}
        deleting = bool(claim["metadata"].get("deletionTimestamp"))
        if status.get("reservedFor"):
            return Outcome(DONE)
        if not status.get("allocation") and claim["metadata"].get("uid") in self.cache.inflight:
            return Outcome(WAIT)   # our write is not visible yet
        for_pod = annotations.get(ANNOTATION_POD, "")
        pod = self.cache.pods.get(for_pod) if for_pod else None
        if not status.get("allocation"):
            # Nothing held; the allocation vanished (the cache reported it) or was released: drop our finalizer.
            return await self._try_release(claim)
        users_active = [p for p in self.cache.claim_users.get(claim_key, ())
                        if p in self.cache.pods and not is_done(self.cache.pods[p])]
        if deleting or (is_done(pod) and not users_active):
            return await self._try_release(claim)
        return Outcome(DONE)

    async def _try_release(self, claim: dict) -> Outcome:
        md = claim["metadata"]
        try:
            fresh = await self.kube.get(claim_path(md.get("namespace", ""), md["name"]))
        except KubeError as e:
            if e.not_found:
                return Outcome(DONE)
            raise
        if (fresh.get("status") or {}).get("allocation") != (claim.get("status") or {}).get("allocation"):
            return Outcome(AGAIN)   # it changed since we decided (allocated again meanwhile): decide on new data
        try:
            if (fresh.get("status") or {}).get("allocation"):
                await release(self.kube, fresh, self.fence)
                metrics.RELEASES.inc()
                log.info("released claim %s/%s (node %s)", md.get("namespace"), md["name"], allocated_node(fresh))
            else:
                await remove_finalizer(self.kube, fresh, self.fence)
            return Outcome(DONE)
        except Lost:
            return Outcome(DONE)     # reserved again meanwhile: in use, keep it
        except KubeError as e:
            if e.conflict or e.not_found:
                return Outcome(AGAIN)
            raise

    # -- summary for the sandbox and tests --------------------------------------------------------
    def snapshot(self) -> dict:
        return {"pending": [k for k, p in self.cache.pods.items() if is_pending(p)],
                "nominated": dict(self._nominated), "missing_taint": sorted(self.cache.tainted_pools_missing)}

