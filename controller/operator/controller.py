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
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

from controller.allocator import AllocationError, Allocator, Features, copy_claim_with_tolerations
from controller.allocator.nodeselector import node_matches
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
from .extendedresources import DEFAULT_NAMES, REASON as EXTENDED_RESOURCE_REASON, ExtendedResourceAdvisor
from .leader import NO_FENCE, Fence, NotLeader
from .nodefit import NodeInfo, Topology, fit
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


class Controller:
    def __init__(self, cfg: ControllerConfig, kube: Kube):
        self.cfg = cfg
        self.kube = kube
        self.cache = Cache(cfg.driver_name)
        self.allocator = Allocator(cfg.features, cfg.strategy, max_steps=cfg.max_search_steps)
        self.events = EventRecorder(kube)
        self.health = HealthReporter(cfg.driver_name)      # events on pods whose devices turned unhealthy
        self.extended = ExtendedResourceAdvisor(cfg.driver_name, cfg.allocation_mode, cfg.extended_resource_names)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._retry: dict[str, tuple[float, float]] = {}     # key -> (next attempt, current backoff)
        self._nominated: dict[str, str] = {}                 # pod key -> node we allocated its claims for
        self._rejected: dict[str, dict[str, float]] = {}     # pod key -> node -> until (PostFilter feedback)
        self._failing_since: dict[str, float] = {}           # pod key -> first failed attempt (monotonic)
        self.why_pending: dict[str, str] = {}                # pod key -> why its last attempt failed
        self.synced = False
        self.attempts = 0
        self.fence: Fence = NO_FENCE        # the leader elector when leader election is on
        self.informers = None               # set by run_controller: Informers (per-resource synced)
        self.lost = False                   # a write was refused for want of leadership: the worker stopped

    # -- inputs ---------------------------------------------------------------------------------
    def on_event(self, kind: str, etype: str, obj: dict) -> None:
        self.cache.apply(kind, etype, obj)
        if kind == "pod":
            k = key(obj)
            if etype != "DELETED" and is_pending(obj):
                self.enqueue(f"pod:{k}")
            else:
                self._nominated.pop(k, None)
                self._rejected.pop(k, None)
                self.extended.forget(obj)
                for pc in pod_claims(obj):
                    if pc.claim_name:
                        self.enqueue(f"claim:{obj['metadata'].get('namespace', '')}/{pc.claim_name}")
        elif kind == "claim":
            k = key(obj)
            self.enqueue(f"claim:{k}")
            for pod in self.cache.claim_users.get(k, ()):
                self.enqueue(f"pod:{pod}")
        else:   # slices, nodes, classes, taint rules: anything pending may fit now
            if kind == "slice" and self.health.on_slice(etype, obj):
                self.enqueue("health:")
            if kind == "devicetaintrule" and etype != "DELETED":
                self.enqueue(f"taint:{obj['metadata']['name']}")
            self.enqueue_pending()
        self._drain_vanished()

    def _drain_vanished(self) -> None:
        """Allocations of ours the cache saw cleared (kube-scheduler's PostFilter): avoid that node, decide again."""
        for claim_key, pod_key, node in self.cache.vanished:
            self._reject(pod_key, node)
            self.enqueue(f"pod:{pod_key}")
        self.cache.vanished.clear()

    def enqueue(self, k: str) -> None:
        if k not in self._queued:
            self._queued.add(k)
            self._queue.put_nowait(k)

    def enqueue_pending(self) -> None:
        for k, pod in self.cache.pods.items():
            if is_pending(pod):
                self._retry.pop(f"pod:{k}", None)
                self.enqueue(f"pod:{k}")

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
                getter = asyncio.create_task(self._queue.get())
                stopper = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for t in (getter, stopper):
                    if t not in done:
                        t.cancel()
                if getter not in done:
                    break
                k = getter.result()
                self._queued.discard(k)
                due = self._retry.get(k)
                if due is not None and due[0] > time.monotonic():
                    continue   # a backoff is running; the ticker re-queues it
                try:
                    self.fence.check(f"anything for {k}")      # lost the lease: stop at once
                    if k.startswith("pod:"):
                        await self.reconcile_pod(k[4:])
                    elif k.startswith("taint:"):
                        await self.report_noexecute(k[6:])
                    elif k == "health:":
                        await self.health.report(self.cache, self.events)
                    else:
                        await self.reconcile_claim(k[6:])
                except NotLeader as e:
                    log.error("stopping the worker: %s", e)
                    self.lost = True
                    break
                except KubeError as e:     # the API server refused or failed (5xx, 429, ...): retried
                    log.warning("reconciling %s failed: %s; retrying with backoff", k, e)
                    self._backoff(k)
                except Exception:  # noqa: BLE001 - one bad object must not stop the controller
                    log.exception("reconciling %s failed", k)
                    self._backoff(k)
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)

    async def _tick(self, stop: asyncio.Event) -> None:
        gauges = CapacityGauges(self.cfg.driver_name, self.cfg.capacity_refresh_seconds)
        while not stop.is_set():
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for k, (at, cur) in list(self._retry.items()):
                if at <= now:
                    self._retry[k] = (0.0, cur)   # due: the worker runs it; a failure doubles ``cur``
                    self.enqueue(k)
            self.cache.expire_inflight()
            metrics.POOLS_MISSING_TAINT.set(len(self.cache.tainted_pools_missing))
            gauges.refresh_controller(self)

    def _backoff(self, k: str, at_least: float = 0.0) -> None:
        _, cur = self._retry.get(k, (0.0, 0.0))
        nxt = min(max(cur * 2, self.cfg.retry_min, at_least), self.cfg.retry_max)
        self._retry[k] = (time.monotonic() + nxt, nxt)

    def _done(self, k: str) -> None:
        self._retry.pop(k, None)

    def _reject(self, pod_key: str, node: str) -> None:
        metrics.VANISHED.inc()
        log.warning("the allocation for pod %s on node %s vanished (kube-scheduler found the node unfit); "
                    "choosing another node", pod_key, node)
        self._rejected.setdefault(pod_key, {})[node] = time.monotonic() + self.cfg.rejection_seconds

    # -- allocation -----------------------------------------------------------------------------
    async def reconcile_pod(self, pod_key: str) -> None:
        k = f"pod:{pod_key}"
        pod = self.cache.pods.get(pod_key)
        if pod is None or not is_pending(pod):
            self._done(k)
            return
        ns = pod["metadata"].get("namespace", "")
        advice_pending = await self._advise_extended_resources(pod, pod_key)
        refs = pod_claims(pod)
        if not refs:
            if advice_pending:
                self._backoff(k)
            else:
                self._done(k)
            return
        if any(r.claim_name is None for r in refs):
            self._backoff(k)      # the resourceclaim controller has not created a template's claim yet
            return
        claims = [self.cache.claim_by_name(ns, r.claim_name or "") for r in refs]
        if any(c is None for c in claims):
            self._backoff(k)
            return
        partita = self.cache.partita_classes()
        ours, others_unallocated = [], 0
        for c in claims:
            own = ownership(c, partita)
            if own.mixed:
                await self.events.post(pod, "Warning", "PartitaMixedClaim",
                                       f"claim {key(c)} mixes Partita device classes with other drivers' classes; "
                                       "in controller mode neither Partita nor kube-scheduler can allocate it — "
                                       "split it into one claim per driver")
            if own.ours:
                ours.append(c)
            elif not (c.get("status") or {}).get("allocation"):
                others_unallocated += 1
        todo = [c for c in ours if not (c.get("status") or {}).get("allocation")
                and c["metadata"].get("uid") not in self.cache.inflight]
        metrics.PENDING_CLAIMS.set(sum(1 for p in self.cache.pods.values() if is_pending(p)))
        if not todo:
            self._done(k)
            return
        errors = []
        for c in todo:
            errors += validate_claim_configs(c.get("spec") or {}, self.cfg.driver_name, f"claim {key(c)} spec.devices")
        if errors:
            self.why_pending[pod_key] = bound_list(errors)
            await self.events.post(pod, "Warning", "PartitaInvalidConfig", self.why_pending[pod_key])
            self._backoff(k)
            return
        if self.cfg.allocation_mode != C.ALLOCATION_MODE_CONTROLLER:
            self._done(k)   # scheduler mode: kube-scheduler allocates; we only validate
            return
        await self._allocate(pod, pod_key, todo, [c for c in claims if (c.get("status") or {}).get("allocation")])

    async def _advise_extended_resources(self, pod: dict, pod_key: str) -> bool:
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
            await self.events.post(pod, "Warning", EXTENDED_RESOURCE_REASON, advice.message)
        return False

    def _candidates(self, pod: Mapping, pod_key: str, allocated_claims: list[dict]) -> tuple[list[NodeInfo], dict[str, str]]:
        reasons: dict[str, str] = {}
        now = time.monotonic()
        rejected = {n: t for n, t in self._rejected.get(pod_key, {}).items() if t > now}
        infos = []
        for name, node in sorted(self.cache.nodes.items()):
            pods = self.cache.pods_on(name)
            pods += [self.cache.pods[p] for p, n in self._nominated.items()
                     if n == name and p != pod_key and p in self.cache.pods and is_pending(self.cache.pods[p])]
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

    async def _allocate(self, pod: dict, pod_key: str, todo: list[dict], allocated_claims: list[dict]) -> None:
        k = f"pod:{pod_key}"
        start = time.perf_counter()
        self.attempts += 1
        candidates, reasons = self._candidates(pod, pod_key, allocated_claims)
        inputs = [copy_claim_with_tolerations(c, [C.managed_toleration()]) for c in todo]
        try:
            with self.cache.share_modes.excluded(self.cache.allocated, todo, self.cache.classes):
                choice = self.allocator.allocate_on_nodes([n.as_node() for n in candidates], inputs,
                                                          self.cache.slices, self.cache.classes, self.cache.allocated)
        except AllocationError as e:
            metrics.ALLOCATIONS.labels("error").inc()
            self.why_pending[pod_key] = str(e)
            await self.events.post(pod, "Warning", "PartitaAllocationError", str(e))
            self._backoff(k, at_least=self.cfg.retry_max / 4)   # bad input: retried slowly
            return
        if choice.node is None:
            metrics.ALLOCATIONS.labels("unschedulable").inc()
            reasons.update(choice.unsatisfiable_reasons)
            self.why_pending[pod_key] = "; ".join([self._explain(todo, reasons)] + self.cache.taint_rules.untolerated(todo))
            first = self._failing_since.setdefault(pod_key, time.monotonic())
            if time.monotonic() - first >= self.cfg.report_after:
                await self.events.post(pod, "Warning", "PartitaUnschedulable", self.why_pending[pod_key])
                self._backoff(k)
            else:
                self._backoff(k, at_least=self.cfg.report_after)
            return
        node = choice.node.name
        try:
            for claim, result in zip(todo, choice.results or []):
                stored = await write_allocation(self.kube, claim, result, pod_key, node, self.fence)
                self.cache.record_write(stored, (stored.get("status") or {}).get("allocation") or result,
                                        int(stored["metadata"].get("resourceVersion") or 0), node, pod_key)
        except Lost as e:
            log.info("allocation for pod %s interrupted: %s; retrying", pod_key, e)
            metrics.ALLOCATIONS.labels("conflict").inc()
            self.enqueue(k)
            return
        except KubeError as e:
            if e.conflict:
                # the claim changed since the cache showed it: decide again once the watch has the change
                metrics.CONFLICTS.inc()
                metrics.ALLOCATIONS.labels("conflict").inc()
                self._backoff(k)
                return
            raise
        self._nominated[pod_key] = node
        self._failing_since.pop(pod_key, None)
        self.why_pending.pop(pod_key, None)
        self._done(k)
        metrics.ALLOCATIONS.labels("allocated").inc()
        metrics.ALLOCATION_SECONDS.observe(time.perf_counter() - start)
        devices = ", ".join(r["device"] for res in choice.results or [] for r in res["devices"]["results"])
        log.info("allocated %s for pod %s on node %s", devices, pod_key, node)
        await self.events.post(pod, "Normal", "PartitaAllocated", f"allocated {devices} on node {node}")

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

    async def report_noexecute(self, rule_name: str) -> None:
        """A NoExecute DeviceTaintRule: an Event on each pod using a device it taints without tolerating it
        (kube-controller-manager's device-taint eviction evicts them; the controller only reports)."""
        rule = self.cache.taint_rules.rules.rules.get(rule_name)
        if rule is None:
            return
        for hit in noexecute_hits(self.cache.taint_rules, rule, self.cache.claims.values()):
            for pod_key in sorted(self.cache.claim_users.get(key(hit.claim), ())):
                pod = self.cache.pods.get(pod_key)
                if pod is not None and not is_done(pod):
                    await self.events.post(pod, "Warning", "PartitaDeviceTaintNoExecute",
                                           f"device {hit.device} of claim {key(hit.claim)} is tainted {hit.taint} by "
                                           f"DeviceTaintRule {hit.rule}; pods that do not tolerate it are evicted "
                                           "(add a toleration to the claim's request to keep running)")

    # -- release --------------------------------------------------------------------------------
    async def reconcile_claim(self, claim_key: str) -> None:
        k = f"claim:{claim_key}"
        claim = self.cache.claims.get(claim_key)
        if claim is None or C.CLAIM_FINALIZER not in (claim["metadata"].get("finalizers") or []):
            self._done(k)
            return
        status = claim.get("status") or {}
        annotations = claim["metadata"].get("annotations") or {}
        deleting = bool(claim["metadata"].get("deletionTimestamp"))
        if status.get("reservedFor"):
            self._done(k)
            return
        if not status.get("allocation") and claim["metadata"].get("uid") in self.cache.inflight:
            return   # our write is not visible yet
        for_pod = annotations.get(ANNOTATION_POD, "")
        pod = self.cache.pods.get(for_pod) if for_pod else None
        if not status.get("allocation"):
            # Nothing held; the allocation vanished (the cache reported it) or was released: drop our finalizer.
            await self._try_release(k, claim)
            return
        users_active = [p for p in self.cache.claim_users.get(claim_key, ())
                        if p in self.cache.pods and not is_done(self.cache.pods[p])]
        if deleting or (is_done(pod) and not users_active):
            await self._try_release(k, claim)
            return
        self._done(k)

    async def _try_release(self, k: str, claim: dict) -> None:
        md = claim["metadata"]
        try:
            fresh = await self.kube.get(claim_path(md.get("namespace", ""), md["name"]))
        except KubeError as e:
            if e.not_found:
                self._done(k)
                return
            raise
        if (fresh.get("status") or {}).get("allocation") != (claim.get("status") or {}).get("allocation"):
            self.enqueue(k)   # it changed since we decided (allocated again meanwhile): decide on new data
            return
        try:
            if (fresh.get("status") or {}).get("allocation"):
                await release(self.kube, fresh, self.fence)
                metrics.RELEASES.inc()
                log.info("released claim %s/%s (node %s)", md.get("namespace"), md["name"], allocated_node(fresh))
            else:
                await remove_finalizer(self.kube, fresh, self.fence)
            self._done(k)
        except Lost:
            self._done(k)     # reserved again meanwhile: in use, keep it
        except KubeError as e:
            if e.conflict or e.not_found:
                self.enqueue(k)
                return
            raise

    # -- summary for the sandbox and tests --------------------------------------------------------
    def snapshot(self) -> dict:
        return {"pending": [k for k, p in self.cache.pods.items() if is_pending(p)],
                "nominated": dict(self._nominated), "missing_taint": sorted(self.cache.tainted_pools_missing)}

