"""Keeps this node's pool of ResourceSlices on the API server equal to what the driver publishes.

* Owns only slices with ``spec.driver`` = this driver and ``spec.nodeName`` = this node.
* At start, and whenever someone changes or deletes one of them (the kubelet wipes a node's slices at
  its start and 30 s after a driver disappears), it re-lists and reconciles within about a second:
  delete obsolete slices, update changed ones, create missing ones. Any change of content bumps the
  pool generation in every slice.
* Reads back what the API server stored. When a field was dropped because a feature gate is off
  (device taints, partitionable devices, consumable capacity), it logs that once and republishes in
  the degraded form: without taints the slices are labelled ``partita.dev/allocation-mode: scheduler``
  so the controller never allocates untainted devices (kube-scheduler does); without counters it
  publishes static MIG; without consumable capacity no shared devices.
* API errors back off exponentially (with jitter) and never end the loop. Slices are never deleted
  on shutdown: the kubelet wipes them if the driver stays away, and a quick restart keeps the node
  schedulable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from driver.api import constants as C
from driver.api.kube import SLICES, Kube, KubeError, node_path, slice_path
from driver.api.quantity import Quantity, QuantityError
from driver.inventory import Inventory
from driver.slices import NO_HEALTH_TAINTS, HealthTaints, SliceFeatures, build_slices

log = logging.getLogger(__name__)


def _same(desired: Any, actual: Any) -> bool:
    """True when every field we publish has the same value in what the server stored (the server may
    add fields such as taint ``timeAdded``; quantities compare by value)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(_same(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(actual, list) and len(desired) == len(actual) and all(
            _same(d, a) for d, a in zip(desired, actual))
    if desired == actual:
        return True
    if isinstance(desired, str) and isinstance(actual, str):
        try:
            return Quantity.parse(desired) == Quantity.parse(actual)
        except QuantityError:
            return False
    return False


def _content(s: dict) -> dict:
    """What must match between a desired and a stored slice (everything but the pool generation)."""
    spec = dict(s.get("spec") or {})
    pool = dict(spec.get("pool") or {})
    pool.pop("generation", None)
    spec["pool"] = pool
    md = s.get("metadata") or {}
    return {"labels": md.get("labels") or {}, "ownerReferences": md.get("ownerReferences") or [], "spec": spec}


def dropped_features(sent: dict, stored: dict) -> dict[str, bool]:
    """Which features the API server dropped from a slice we wrote (keys of SliceFeatures)."""
    out = {"taints": False, "partitionable": False, "consumable_capacity": False, "health_taints": False}
    s_spec, r_spec = sent.get("spec") or {}, stored.get("spec") or {}
    if s_spec.get("sharedCounters") and not r_spec.get("sharedCounters"):
        out["partitionable"] = True
    stored_devices = {d.get("name"): d for d in r_spec.get("devices") or []}
    for d in s_spec.get("devices") or []:
        r = stored_devices.get(d["name"], {})
        if d.get("taints") and not r.get("taints"):
            out["taints"] = True
            out["health_taints"] = out["health_taints"] or any(t.get("key") == C.HEALTH_TAINT_KEY for t in d["taints"])
        if d.get("consumesCounters") and not r.get("consumesCounters"):
            out["partitionable"] = True
        if d.get("allowMultipleAllocations") and not r.get("allowMultipleAllocations"):
            out["consumable_capacity"] = True
        for name, cap in (d.get("capacity") or {}).items():
            if "requestPolicy" in cap and "requestPolicy" not in ((r.get("capacity") or {}).get(name) or {}):
                out["consumable_capacity"] = True
    return out


_FALLBACK_MESSAGES = {
    "taints": "the API server dropped device taints (feature gate DRADeviceTaints off): publishing in "
              "scheduler mode (no taint, label partita.dev/allocation-mode=scheduler); kube-scheduler allocates "
              "these devices and the Partita controller will not; unhealthy devices are left out instead of "
              "tainted",
    "partitionable": "the API server dropped sharedCounters/consumesCounters (feature gate DRAPartitionableDevices "
                     "off): publishing static MIG (existing MIG devices only, MIG-enabled GPUs not offered whole) "
                     "and no shared devices",
    "consumable_capacity": "the API server dropped allowMultipleAllocations/requestPolicy (feature gate "
                           "DRAConsumableCapacity off): not publishing shared GPU devices; share a GPU by "
                           "referencing one ResourceClaim from several pods instead",
    "health_taints": "the API server dropped device taints (feature gate DRADeviceTaints off): unhealthy devices "
                     "are left out of the ResourceSlices instead of being tainted (docs/health.md)",
}


class SlicePublisher:
    def __init__(self, kube: Kube, *, driver_name: str, node_name: str, inventory: Inventory,
                 features: SliceFeatures = SliceFeatures(), node_uid: str | None = None,
                 resync_seconds: float = 60.0, react_seconds: float = 0.5, max_backoff: float = 30.0):
        self._kube = kube
        self.driver_name = driver_name
        self.node_name = node_name
        self._inventory = inventory
        self.features = features
        self._node_uid = node_uid
        self._resync = resync_seconds
        self._react = react_seconds
        self._max_backoff = max_backoff
        self._wake = asyncio.Event()
        self._written: set[str] = set()      # resourceVersions we wrote ourselves
        self.reconciles = 0                  # completed reconcile passes (for tests and metrics)
        self.in_sync = False
        self._health = NO_HEALTH_TAINTS

    @property
    def selector(self) -> str:
        return f"spec.driver={self.driver_name},spec.nodeName={self.node_name}"

    def update_inventory(self, inventory: Inventory) -> None:
        """Publish a new inventory (e.g. MIG devices changed); reconciled promptly by :meth:`run`."""
        self._inventory = inventory
        self._wake.set()

    def update_health(self, health: HealthTaints) -> None:
        """Publish new device health taints (driver/plugin/healthmon.py); reconciled promptly by :meth:`run`,
        at most once per ``react_seconds`` however often health changes."""
        if health != self._health:
            self._health = health
            self._wake.set()

    def desired(self, generation: int = 1) -> list[dict]:
        return build_slices(self._inventory, driver_name=self.driver_name, node_uid=self._node_uid or "",
                            features=self.features, generation=generation, health=self._health)

    # -- one reconcile pass ---------------------------------------------------------------------
    async def _ensure_node_uid(self) -> None:
        if not self._node_uid:
            node = await self._kube.get(node_path(self.node_name))
            self._node_uid = node["metadata"]["uid"]

    async def reconcile(self) -> None:
        """Make the pool on the server match :meth:`desired`. Raises KubeError on API failures."""
        await self._ensure_node_uid()
        for _ in range(4):  # a dropped feature degrades and reconciles again; at most once per feature
            existing = (await self._kube.list(SLICES, fieldSelector=self.selector)).get("items") or []
            current_gen = max((s["spec"]["pool"].get("generation", 0) for s in existing), default=0)
            desired = self.desired(generation=max(current_gen, 1))
            by_name = {s["metadata"]["name"]: s for s in existing}
            up_to_date = (len(existing) == len(desired) and
                          all(d["metadata"]["name"] in by_name and
                              by_name[d["metadata"]["name"]]["spec"]["pool"].get("generation") == current_gen and
                              _same(_content(d), _content(by_name[d["metadata"]["name"]])) for d in desired))
            if up_to_date:
                self.in_sync = True
                self.reconciles += 1
                return
            self.in_sync = False
            desired = self.desired(generation=current_gen + 1)
            names = {d["metadata"]["name"] for d in desired}
            for s in existing:
                if s["metadata"]["name"] not in names:
                    try:
                        await self._kube.delete(slice_path(s["metadata"]["name"]), uid=s["metadata"].get("uid"))
                        log.info("deleted obsolete ResourceSlice %s", s["metadata"]["name"])
                    except KubeError as e:
                        if not e.not_found:
                            raise
            drops = {"taints": False, "partitionable": False, "consumable_capacity": False, "health_taints": False}
            for d in desired:
                name = d["metadata"]["name"]
                if name in by_name:
                    body = {**d, "metadata": {**d["metadata"],
                                              "resourceVersion": by_name[name]["metadata"]["resourceVersion"]}}
                    stored = await self._kube.replace(slice_path(name), body)
                else:
                    stored = await self._kube.create(SLICES, d)
                if len(self._written) > 4096:
                    self._written.clear()
                self._written.add(stored["metadata"].get("resourceVersion", ""))
                for k, v in dropped_features(d, stored).items():
                    drops[k] = drops[k] or v
            log.info("published %d ResourceSlice(s) for node %s, pool generation %d", len(desired), self.node_name,
                     desired[0]["spec"]["pool"]["generation"])
            degraded = {k for k, v in drops.items() if v and getattr(self.features, k)}
            if not degraded:
                self.in_sync = True
                self.reconciles += 1
                return
            if "taints" in degraded and self.features.health_taints:
                degraded.add("health_taints")        # no device taints at all: health taints neither
            for k in sorted(degraded):
                if k == "health_taints" and "taints" in degraded:
                    continue                         # said with the taints message
                log.warning("%s", _FALLBACK_MESSAGES[k])
            self.features = self.features.without(**{k: True for k in degraded})
        raise RuntimeError("ResourceSlices kept changing while being published")

    # -- the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile now, then on every change to our slices, on new inventory, and every resync period."""
        watcher = asyncio.create_task(self._watch(stop))
        backoff = 0.2
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.reconcile()
                    backoff = 0.2
                    timeout = self._resync
                except (KubeError, OSError, asyncio.TimeoutError) as e:
                    self.in_sync = False
                    timeout = backoff * (0.5 + random.random())
                    log.warning("publishing ResourceSlices for node %s failed (%s); retrying in %.1fs",
                                self.node_name, e, timeout)
                    backoff = min(backoff * 2, self._max_backoff)
                except Exception:  # never let the plugin lose its publisher
                    self.in_sync = False
                    log.exception("unexpected error while publishing ResourceSlices; retrying")
                    timeout = backoff
                    backoff = min(backoff * 2, self._max_backoff)
                await _wait_any(stop, self._wake, timeout)
                if self._wake.is_set() and not stop.is_set():
                    await asyncio.sleep(self._react)   # let a burst of events settle
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        """Wake the reconcile loop whenever someone else changes or deletes one of our slices."""
        rv: str | None = None
        backoff = 0.2
        while not stop.is_set():
            try:
                if rv is None:
                    rv = (await self._kube.list(SLICES, fieldSelector=self.selector))["metadata"].get("resourceVersion")
                async for ev in self._kube.watch(SLICES, resource_version=rv, fieldSelector=self.selector,
                                                 timeout_seconds=240):
                    obj = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        rv = None
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
                    if ev.get("type") == "BOOKMARK":
                        continue
                    if ev.get("type") == "DELETED" or rv not in self._written:
                        self._wake.set()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - re-list and watch again
                log.debug("watch of ResourceSlices ended (%s); re-listing", e)
                rv = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
