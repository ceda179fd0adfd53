"""Leader election on a coordination.k8s.io/v1 Lease, client-go style: acquire when the lease is free
or expired, renew every ``retry`` seconds, and report loss when renewal has failed for the lease
duration (the process then exits so its Deployment restarts it as a candidate)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import uuid

from driver.api.kube import Kube, KubeError, namespaced_path

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _fmt(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(s: str | None) -> datetime.datetime | None:
    if not s:
        return None
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            continue
    return None


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, name: str, identity: str | None = None,
                 lease_seconds: int = 15, retry_seconds: float = 2.0):
        self._kube = kube
        self.path = namespaced_path("/apis/coordination.k8s.io/v1", namespace, "leases", name, kind="Lease")
        self.collection = namespaced_path("/apis/coordination.k8s.io/v1", namespace, "leases", kind="Lease")
        self.namespace, self.name = namespace, name
        self.identity = identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.lease_seconds = lease_seconds
        self.retry = retry_seconds
        self.is_leader = False

    async def _try(self) -> bool:
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
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
            return True
        cur = lease.get("spec") or {}
        holder = cur.get("holderIdentity")
        renewed = _parse(cur.get("renewTime"))
        duration = int(cur.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and renewed is not None and \
                (now - renewed).total_seconds() < duration:
            return False
        if holder != self.identity:
            spec["acquireTime"] = _fmt(now)
            spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0) + 1
        else:
            spec["acquireTime"] = cur.get("acquireTime") or _fmt(now)
            spec["leaseTransitions"] = int(cur.get("leaseTransitions") or 0)
        lease["spec"] = spec
        await self._kube.replace(self.path, lease)      # resourceVersion precondition from the GET
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Block until this instance leads (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            try:
                if await self._try():
                    self.is_leader = True
                    log.info("became the leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
                    return True
            except (KubeError, OSError) as e:
                log.debug("leader election attempt failed: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), self.retry)
            except asyncio.TimeoutError:
                pass
        return False

    async def release(self) -> None:
        """Give the lease up on a clean stop so that a standby takes over at once, not after it expires."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            lease = await self._kube.get(self.path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1,
                             "renewTime": _fmt(_now())}
            await self._kube.replace(self.path, lease)
            log.info("released the lease %s/%s", self.namespace, self.name)
        except (KubeError, OSError) as e:
            log.warning("could not release the lease %s/%s: %s (a standby takes over when it expires)",
                        self.namespace, self.name, e)

    async def keep(self, stop: asyncio.Event) -> None:
        """Renew until ``stop``; returns when leadership is lost (renewals failed for the lease duration)."""
        last_ok = asyncio.get_running_loop().time()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.retry)
                return
            except asyncio.TimeoutError:
                pass
            try:
                if await self._try():
                    last_ok = asyncio.get_running_loop().time()
                    continue
                log.error("another instance took the lease %s/%s", self.namespace, self.name)
                break
            except (KubeError, OSError) as e:
                log.warning("renewing the lease failed: %s", e)
            if asyncio.get_running_loop().time() - last_ok > self.lease_seconds:
                log.error("could not renew the lease for %ss", self.lease_seconds)
                break
        self.is_leader = False
