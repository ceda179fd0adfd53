"""Leader election on a coordination.k8s.io/v1 Lease, client-go style, and the fence every write passes.

* Acquire when the lease is free (no holder) or expired. Expiry is judged on this instance's monotonic
  clock from when it last *observed the lease record change* (client-go's observedTime), never from the
  holder's renewTime, so wall-clock skew between machines does not matter.
* Renew every ``retry_period``. This instance may write only while
  ``now < last successful renew + renew_deadline`` (monotonic; "last renew" is taken before the renew
  request is sent), and ``renew_deadline < lease_duration``: it stops writing before any other instance
  can consider the lease expired, with ``lease_duration - renew_deadline`` to spare for clock rate
  differences and requests in flight.
* Loss (another holder seen, or the renew deadline passed, e.g. after the process was paused) is final:
  ``lost`` is set, every later :meth:`check` raises :class:`NotLeader`, and the process exits so its
  Deployment restarts it as a candidate.

The fence (:meth:`check`, :meth:`confirm`) is what the writer calls immediately before each write:
``check`` is the monotonic deadline test (no I/O, so nothing can run between it and the write);
``confirm`` first re-reads the Lease and requires this instance's identity and the lease transitions it
acquired at (nobody else held the lease since), then checks the deadline, for the writes that hand out or
free devices. kopf's peering was not used: it has no lease deadline and no fencing of writes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import time
import uuid
from typing import Callable, Protocol

from driver.api.kube import Kube, KubeError, namespaced_path
from driver.errors import PartitaError

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _fmt(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NotLeader(PartitaError):
    """This instance does not hold an unexpired lease: the write was not sent."""


class Fence(Protocol):
    def check(self, what: str) -> None: ...

    async def confirm(self, what: str) -> None: ...


class NoFence:
    """Leader election off (one replica by configuration): every write may go."""

    def check(self, what: str) -> None:
        return None

    async def confirm(self, what: str) -> None:
        return None


NO_FENCE = NoFence()


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str | None = None,
                 lease_seconds: float = 15.0, renew_deadline: float = 10.0, retry_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < retry_seconds < renew_deadline < lease_seconds:
            raise ValueError(f"leader election for lease {namespace}/{name}: need 0 < retry period ({retry_seconds}s) "
                             f"< renew deadline ({renew_deadline}s) < lease duration ({lease_seconds}s); "
                             "set --leader-retry-period, --leader-renew-deadline and --leader-lease-duration so")
        self._kube = kube
        self.path = namespaced_path("/apis/coordination.k8s.io/v1", namespace, "leases", name, kind="Lease")
        self.collection = namespaced_path("/apis/coordination.k8s.io/v1", namespace, "leases", kind="Lease")
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.lease_seconds = lease_seconds
        self.renew_deadline = renew_deadline
        self.retry = retry_seconds
        self.clock = clock
        self.is_leader = False
        self.lost = asyncio.Event()
        self.refused = 0                    # writes the fence stopped
        self._renewed_at: float | None = None        # monotonic, before the last successful renew's request
        self._transitions: int | None = None         # leaseTransitions when this instance acquired
        self._observed: tuple | None = None          # the other holder's lease record as last seen
        self._observed_at = 0.0

    # -- the fence --------------------------------------------------------------------------------
    def holds(self) -> bool:
        return (self.is_leader and not self.lost.is_set() and self._renewed_at is not None
                and self.clock() < self._renewed_at + self.renew_deadline)

    def check(self, what: str) -> None:
        if self.holds():
            return
        self.refused += 1
        age = self.clock() - self._renewed_at if self._renewed_at is not None else float("inf")
        self._lose(f"the lease was last renewed {age:.2f}s ago (renew deadline {self.renew_deadline}s)"
                   if self.is_leader and not self.lost.is_set() else "this instance is not the leader")
        raise NotLeader(f"not writing {what}: this instance ({self.identity}) holds no unexpired lease "
                        f"{self.namespace}/{self.name}")

    async def confirm(self, what: str) -> None:
        self.check(what)
        try:
            lease = await self._kube.get(self.path)
        except (KubeError, OSError) as e:
            raise NotLeader(f"not writing {what}: could not re-read the lease {self.namespace}/{self.name}: {e}") from e
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity or \
                int(spec.get("leaseTransitions") or 0) != self._transitions:
            self.refused += 1
            self._lose(f"the lease is held by {spec.get('holderIdentity')!r} (transitions "
                       f"{spec.get('leaseTransitions')}, ours {self._transitions})")
            raise NotLeader(f"not writing {what}: the lease {self.namespace}/{self.name} is no longer ours")
        self.check(what)

    def _lose(self, why: str) -> None:
        if self.is_leader and not self.lost.is_set():
            log.error("lost leadership of lease %s/%s (identity %s): %s; no further writes",
                      self.namespace, self.name, self.identity, why)
        self.lost.set()

    # -- election ---------------------------------------------------------------------------------
    async def _try(self) -> bool:
        started = self.clock()
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": int(round(self.lease_seconds)) or 1,
                "renewTime": _fmt(now)}
        try:
            lease = await self._kube.get(self.path)
        except KubeError as e:
            if not e.not_found:
                raise
            await self._kube.create(self.collection, {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _fmt(now), "leaseTransitions": 0}})
            self._won(started, 0)
            return True
        cur = lease.get("spec") or {}
        holder = cur.get("holderIdentity")
        transitions = int(cur.get("leaseTransitions") or 0)
        if holder and holder != self.identity:
            if self.is_leader:
                return False                 # someone else holds it now: lost
            record = (holder, cur.get("renewTime"), cur.get("leaseDurationSeconds"), transitions)
            if record != self._observed:
                self._observed, self._observed_at = record, self.clock()
            duration = float(cur.get("leaseDurationSeconds") or self.lease_seconds)
            if self.clock() < self._observed_at + duration:
                return False                 # held, and not expired as far as we have seen
        if holder == self.identity and self.is_leader:
            spec["acquireTime"] = cur.get("acquireTime") or _fmt(now)
            spec["leaseTransitions"] = transitions
        elif holder == self.identity:
            # our own identity from before (not leading now): take it as a new term
            spec["acquireTime"] = _fmt(now)
            spec["leaseTransitions"] = transitions + 1
        else:
            spec["acquireTime"] = _fmt(now)
            spec["leaseTransitions"] = transitions + 1
        if self.is_leader and self._transitions is not None and spec["leaseTransitions"] != self._transitions:
            return False                     # someone else held it in between
        lease["spec"] = spec
        await self._kube.replace(self.path, lease)      # resourceVersion precondition from the GET
        self._won(started, spec["leaseTransitions"])
        return True

    def _won(self, started: float, transitions: int) -> None:
        self._renewed_at = started
        self._transitions = transitions

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Block until this instance leads (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            try:
                if await self._try():
                    self.is_leader = True
                    log.info("became the leader (lease %s/%s, identity %s, transitions %s)", self.namespace,
                             self.name, self.identity, self._transitions)
                    return True
            except (KubeError, OSError, asyncio.TimeoutError) as e:
                log.debug("leader election attempt failed: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), self.retry)
            except asyncio.TimeoutError:
                pass
        return False

    async def release(self) -> None:
        """Give the lease up on a clean stop so that a standby takes over at once, not after it expires."""
        if not self.is_leader or not self.holds():
            self.is_leader = False
            return
        self.is_leader = False
        try:
            lease = await self._kube.get(self.path)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity or int(spec.get("leaseTransitions") or 0) != self._transitions:
                return
            lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": _fmt(_now())}
            await self._kube.replace(self.path, lease)
            log.info("released the lease %s/%s", self.namespace, self.name)
        except (KubeError, OSError) as e:
            log.warning("could not release the lease %s/%s: %s (a standby takes over when it expires)",
                        self.namespace, self.name, e)

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until ``stop``; returns when leadership is lost (another holder, or no successful renew
        within the renew deadline)."""
        while not stop.is_set() and not self.lost.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.retry)
                return
            except asyncio.TimeoutError:
                pass
            if not self.holds():
                self._lose(f"no successful renew within the renew deadline ({self.renew_deadline}s)")
                break
            left = (self._renewed_at or 0.0) + self.renew_deadline - self.clock()
            try:
                if await asyncio.wait_for(self._try(), max(left, 0.01)):
                    continue
                self._lose("another instance took the lease")
                break
            except (KubeError, OSError, asyncio.TimeoutError) as e:
                log.warning("renewing the lease %s/%s failed: %s", self.namespace, self.name, e)
        self.is_leader = False
