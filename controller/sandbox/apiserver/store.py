"""The storage layer (k8s.io/apiserver pkg/registry/generic/registry and pkg/storage): objects by
resource and (namespace, name), one global integer resourceVersion bumped on every write (deletes too),
server metadata (uid, creationTimestamp, generation, generateName), finalizers and deletionTimestamp,
background garbage collection by owner UID, and a bounded per-resource watch log fanned out to watchers.

Thread-safe: every operation holds one re-entrant lock; objects handed out are copies."""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Callable

from . import selectors as sel
from .claims import ClaimStrategy
from .errors import ApiError, not_found
from .gates import FeatureGates
from .nodes import NodeStrategy
from .pods import PodStrategy
from .resources import RESOURCES, Resource
from .slices import SliceStrategy
from .strategy import Strategy, admit

#: a watch log entry: (resourceVersion, event type, object, the object before the write or None)
Event = tuple[int, str, dict, "dict | None"]

_STRATEGIES: dict[str, Strategy] = {"/pods": PodStrategy(), "/nodes": NodeStrategy(),
                                    "resource.k8s.io/resourceclaims": ClaimStrategy(),
                                    "resource.k8s.io/resourceslices": SliceStrategy()}
_GENERIC = Strategy()


def strategy_for(res: Resource) -> Strategy:
    """The rules of ``res`` (resources without rules of their own get the generic ones)."""
    return _STRATEGIES.get(res.key, _GENERIC)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Watcher:
    res: Resource
    namespace: str | None
    labels: sel.LabelSelector
    fields: sel.FieldSelector
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class WatchLog:
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    oldest_rv: int = 0


class Store:
    def __init__(self, *, log_size: int = 4096, gates: FeatureGates | None = None,
                 on_write: Callable[[], None] | None = None):
        self.lock = threading.RLock()
        self.gates = gates or FeatureGates()
        self._objs: dict[str, dict[tuple[str, str], dict]] = {r.key: {} for r in RESOURCES}
        self._rv = itertools.count(1)
        self._last_rv = 0
        self._logs: dict[str, WatchLog] = {r.key: WatchLog(collections.deque(maxlen=log_size)) for r in RESOURCES}
        self.watchers: list[Watcher] = []
        self._on_write = on_write

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out."""
        return self._last_rv

    # ---------------------------------------------------------------- reads
    def peek(self, res: Resource, ns: str, name: str) -> dict | None:
        """The stored object itself (not a copy: callers hold ``lock`` and never change it)."""
        return self._objs[res.key].get((ns if res.namespaced else "", name))

    def items(self, res: Resource, ns: str | None = None) -> list[dict]:
        """The stored objects of ``res`` (in namespace ``ns``; all when None) sorted by (namespace, name),
        not copies."""
        with self.lock:
            return [o for (ons, _), o in sorted(self._objs[res.key].items()) if ns is None or ons == ns]

    def list(self, res: Resource, ns: str | None, labels: sel.LabelSelector, fields: sel.FieldSelector) -> dict:
        with self.lock:
            items = [o for o in self.items(res, ns) if labels.matches(o) and fields.matches(o)]
            return {"apiVersion": res.api_version, "kind": f"{res.kind}List",
                    "metadata": {"resourceVersion": str(self._last_rv)}, "items": items}

    # ---------------------------------------------------------------- watch log
    def log(self, res: Resource) -> WatchLog:
        return self._logs[res.key]

    def compact(self, plural: str | None = None) -> None:
        """Forget the watch log (of ``plural``), as etcd compaction does."""
        with self.lock:
            for r in RESOURCES:
                if plural is None or r.plural == plural:
                    log = self._logs[r.key]
                    log.events.clear()
                    log.oldest_rv = self._last_rv

    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _emit(self, res: Resource, etype: str, obj: dict, old: dict | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        log = self._logs[res.key]
        if len(log.events) == log.events.maxlen:
            log.oldest_rv = log.events[0][0]
        log.events.append((rv, etype, obj, old))
        for w in self.watchers:
            if w.res is res:
                w.loop.call_soon_threadsafe(w.queue.put_nowait, (rv, etype, obj, old))
        if self._on_write is not None:
            self._on_write()

    # ---------------------------------------------------------------- writes
    def create(self, res: Resource, ns: str, obj: dict, drop_status: bool, field_validation: str = "Warn") -> dict:
        strategy = strategy_for(res)
        with self.lock:
            md = obj.setdefault("metadata", {})
            if res.namespaced:
                md["namespace"] = ns
            else:
                md.pop("namespace", None)
            table = self._objs[res.key]
            if not md.get("name"):
                if not md.get("generateName"):
                    raise ApiError(422, "Invalid", f"{res.kind}: metadata.name or metadata.generateName is required")
                for _ in range(100):
                    cand = md["generateName"] + uuidlib.uuid4().hex[:5]
                    if (ns, cand) not in table:
                        md["name"] = cand
                        break
            k = (ns if res.namespaced else "", md["name"])
            if k in table:
                raise ApiError(409, "AlreadyExists", f'{res.plural} "{md["name"]}" already exists')
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            if drop_status and res.has_status and not strategy.keeps_status_on_create:
                obj.pop("status", None)
            obj = admit(res, obj, None, field_validation)
            strategy.prepare_for_create(obj, self.gates)
            md = obj["metadata"]
            md["uid"] = str(uuidlib.uuid4())
            md["creationTimestamp"] = _now()
            md["generation"] = 1
            md.pop("deletionTimestamp", None)
            md["resourceVersion"] = self._next_rv()
            table[k] = obj
            self._emit(res, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def replace(self, res: Resource, ns: str, name: str, new: dict, *, status: bool, precondition: bool,
                field_validation: str = "Warn") -> dict:
        strategy = strategy_for(res)
        with self.lock:
            table = self._objs[res.key]
            old = table.get((ns, name))
            if old is None:
                raise not_found(res.plural, name)
            new_md = new.get("metadata") or {}
            if precondition and new_md.get("resourceVersion") and new_md["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object has '
                                                "been modified; please apply your changes to the latest version and try again")
            if status:
                merged = copy.deepcopy(old)
                merged["status"] = new.get("status")
                if merged["status"] is None:
                    merged.pop("status")
                strategy.prepare_for_status_update(merged, old, self.gates)
            else:
                merged = new
                md = merged.setdefault("metadata", {})
                for f in ("uid", "creationTimestamp", "deletionTimestamp", "generation"):
                    if f in old["metadata"]:
                        md[f] = old["metadata"][f]
                    else:
                        md.pop(f, None)
                md["name"] = name
                if res.namespaced:
                    md["namespace"] = ns
                if res.has_status:
                    if "status" in old:
                        merged["status"] = old["status"]
                    else:
                        merged.pop("status", None)
                merged["apiVersion"], merged["kind"] = res.api_version, res.kind
                merged = admit(res, merged, old, field_validation)
                md = merged["metadata"]
                if old.get("spec") != merged.get("spec"):
                    md["generation"] = old["metadata"].get("generation", 1) + 1
                strategy.prepare_for_update(merged, old, self.gates)
            merged["apiVersion"], merged["kind"] = res.api_version, res.kind
            merged["metadata"]["resourceVersion"] = self._next_rv()
            if merged["metadata"].get("deletionTimestamp") and not merged["metadata"].get("finalizers"):
                del table[(ns, name)]
                self._emit(res, "DELETED", merged, old)
                self._collect_garbage(merged)
            else:
                table[(ns, name)] = merged
                self._emit(res, "MODIFIED", merged, old)
            return copy.deepcopy(merged)

    def delete(self, res: Resource, ns: str, name: str, preconditions: dict) -> dict | None:
        with self.lock:
            table = self._objs[res.key]
            old = table.get((ns, name))
            if old is None:
                raise not_found(res.plural, name)
            for f in ("uid", "resourceVersion"):
                if preconditions.get(f) and preconditions[f] != old["metadata"].get(f):
                    raise ApiError(409, "Conflict", f"Precondition failed: {f} in precondition: {preconditions[f]}, "
                                                    f"{f} in object meta: {old['metadata'].get(f)}")
            if old["metadata"].get("finalizers"):
                if old["metadata"].get("deletionTimestamp"):
                    return copy.deepcopy(old)
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["resourceVersion"] = self._next_rv()
                table[(ns, name)] = new
                self._emit(res, "MODIFIED", new, old)
                return copy.deepcopy(new)
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = self._next_rv()
            del table[(ns, name)]
            self._emit(res, "DELETED", gone, old)
            self._collect_garbage(gone)
            return gone

    def _collect_garbage(self, owner: dict) -> None:
        """Background GC of objects owned by a deleted object (by owner UID)."""
        uid = owner["metadata"].get("uid")
        for r in RESOURCES:
            for (ns, name), o in list(self._objs[r.key].items()):
                if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or []):
                    try:
                        self.delete(r, ns, name, {})
                    except ApiError:
                        pass
