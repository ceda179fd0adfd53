"""An in-process Kubernetes API server emulator for the sandbox and the integration tests.

Never used against a cluster. It serves the Kubernetes HTTP API on 127.0.0.1 (aiohttp, JSON) for the
resources Partita touches, with the semantics its clients rely on (docs/architecture.md §7):

* discovery (``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/<g>/<v>``) as kopf and the official
  client expect, including ``namespaces`` (without it kopf starts no watchers);
* server metadata: uid, creationTimestamp, generation (+1 on spec change), one global integer
  resourceVersion bumped on every write (deletes too), generateName, namespace from the URL;
* get, list (label selectors ``= == != in notin key !key``; field selectors on dotted paths ``= == !=``),
  create (409 AlreadyExists), PUT (409 Conflict on a stale ``metadata.resourceVersion``), PATCH
  (merge-patch; strategic-merge treated as merge-patch; JSON patch with 422 on a failed ``test``), delete
  (finalizers -> deletionTimestamp; the last finalizer removed -> gone; preconditions), deletecollection;
* status subresources (pods, nodes, resourceclaims): create drops status, main writes keep it, status
  writes change only status (metadata changes other than the resourceVersion precondition are ignored);
* ``pods/binding`` sets ``spec.nodeName`` (409 when already bound);
* watch: JSON lines, initial ADDED events, resume from a bounded per-resource log, ``410 Expired`` as an
  ERROR event when too old, BOOKMARKs, ``timeoutSeconds``, selectors with ADDED/DELETED when an object
  enters or leaves them, ``sendInitialEvents`` with the ``k8s.io/initial-events-end`` bookmark;
* garbage collection of objects owned by a deleted Node or Pod (background);
* ResourceClaim status rules the product depends on: ``status.allocation`` is immutable once set,
  ``reservedFor`` needs an allocation, no new consumers while the claim is being deleted; ``status.devices``
  (KEP-4817) validated as upstream does (validation.claim_device_status: allocated devices only, conditions,
  ``data`` a JSON object of at most 10 KiB) and its entries for deallocated devices dropped;
* feature gates off: fields a real API server drops (device taints, partitionable devices, consumable
  capacity, claim device status) can be dropped the same way (``drop_features``).

Python API (for tests and the sandbox)::

    server = ApiServer(bookmark_interval=1.0)
    await server.start()            # in the running loop; or server.start_in_thread() from sync code
    server.url                      # "http://127.0.0.1:<port>"
    server.create(obj) / server.get(plural, name, ns) / server.list(plural, ns=None) /
    server.update(obj) / server.update_status(obj) / server.delete(plural, name, ns)   # thread-safe
    server.inject_fault(plural, verb, status, count=1, name=None, delay=0.0)  # next N matching requests
                                    # fail (status 0: only delayed by ``delay`` seconds, then served)
    server.drop_watches(plural=None) / server.compact(plural=None)  # end open watches / expire resumes (410)
    await server.wait_for(lambda s: ..., timeout=5)                 # no blind sleeps
    server.drop_features({"DRADeviceTaints"})                       # emulate a gate that is off
    await server.stop()             # or server.stop_in_thread()

Plurals name resources (``pods``, ``nodes``, ``resourceclaims``, ``resourceslices``, ...).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import json
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import jsonpatch
from aiohttp import web

from controller.sandbox import apiserver_selectors as sel
from controller.sandbox import validation


@dataclass(frozen=True)
class Resource:
    group: str            # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...] = ()
    short: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = [
    Resource("", "v1", "pods", "Pod", True, ("status", "binding")),
    Resource("", "v1", "nodes", "Node", False, ("status",)),
    Resource("", "v1", "namespaces", "Namespace", False, ("status",)),
    Resource("", "v1", "events", "Event", True),
    Resource("", "v1", "configmaps", "ConfigMap", True),
    Resource("", "v1", "services", "Service", True),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True),
    Resource("events.k8s.io", "v1", "events", "Event", True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    Resource("resource.k8s.io", "v1", "resourceslices", "ResourceSlice", False),
    Resource("resource.k8s.io", "v1", "resourceclaims", "ResourceClaim", True, ("status",)),
    Resource("resource.k8s.io", "v1", "resourceclaimtemplates", "ResourceClaimTemplate", True),
    Resource("resource.k8s.io", "v1", "deviceclasses", "DeviceClass", False),
    Resource("resource.k8s.io", "v1alpha3", "devicetaintrules", "DeviceTaintRule", False),   # as 1.33-1.35 serve it
    Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False),
]
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
#: events exist in two groups; store keys use "<group>/<plural>" so they do not mix
_STATUS_RESOURCES = {"pods", "nodes", "resourceclaims", "namespaces"}
#: status subresources whose status a create keeps: "Nodes allow *all* fields, including status, to be set on
#: create" (kubernetes pkg/registry/core/node/strategy.go, PrepareForCreate): the kubelet registers its Node with
#: capacity and allocatable
_STATUS_KEPT_ON_CREATE = {"nodes"}

#: feature gate -> what a real API server drops from ResourceSlices/claim status when it is off
FEATURES = ("DRADeviceTaints", "DRAPartitionableDevices", "DRAConsumableCapacity", "DRAResourceClaimDeviceStatus")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
               "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def _admit(res: Resource, obj: dict, old: dict | None, field_validation: str) -> dict:
    """Decoding, defaulting and validation of a create or update (controller/sandbox/validation.py)."""
    try:
        stored, _warnings = validation.admit(obj, old, field_validation)
    except validation.Rejected as e:
        name = (obj.get("metadata") or {}).get("name", "")
        raise ApiError(e.code, e.reason, e.message, e.details(name, res.group, res.kind)) from None
    return stored


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(res: Resource) -> str:
    return f"{res.group}/{res.plural}"


@dataclass
class _Fault:
    plural: str
    verb: str
    status: int           # 0: no error, only the delay
    count: int
    name: str | None
    delay: float = 0.0


@dataclass
class _Watcher:
    res: Resource
    namespace: str | None
    labels: sel.LabelSelector
    fields: sel.FieldSelector
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Log:
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    oldest_rv: int = 0


class ApiServer:
    def __init__(self, *, bookmark_interval: float = 5.0, log_size: int = 4096, port: int = 0,
                 test_hooks: bool = False):
        self._lock = threading.RLock()
        self._objs: dict[str, dict[tuple[str, str], dict]] = {_key(r): {} for r in RESOURCES}
        self._rv = itertools.count(1)
        self._last_rv = 0
        self._logs: dict[str, _Log] = {_key(r): _Log(collections.deque(maxlen=log_size)) for r in RESOURCES}
        self._watchers: list[_Watcher] = []
        self._faults: list[_Fault] = []
        self._dropped: set[str] = set()
        self._bookmark = bookmark_interval
        self._port = port
        self._test_hooks = test_hooks     # serve POST /_test/{fault,compact,drop-watches} (a process's tests)
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._changed: asyncio.Condition | None = None
        self.requests = 0
        self.url = ""
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        for w in list(self._watchers):
            w.loop.call_soon_threadsafe(w.queue.put_nowait, None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self) -> str:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="apiserver", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self.url

    def stop_in_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ---------------------------------------------------------------- client configs
    def client_configuration(self):  # noqa: ANN201
        from kubernetes import client

        return client.Configuration(host=self.url)

    def aio_client_configuration(self):  # noqa: ANN201
        from kubernetes.aio import client

        return client.Configuration(host=self.url)

    def kopf_connection(self):  # noqa: ANN201
        import kopf

        return kopf.ConnectionInfo(server=self.url, insecure=True)

    # ---------------------------------------------------------------- test hooks
    def inject_fault(self, plural: str, verb: str, status: int, count: int = 1, name: str | None = None,
                     delay: float = 0.0) -> None:
        """The next ``count`` requests for ``plural`` with ``verb`` (get, list, watch, create, update,
        patch, delete) wait ``delay`` seconds, then answer ``status`` without touching state; status 0
        only delays them (a slow API server: the request is then served, and lands late)."""
        if status and not 400 <= status <= 599:
            raise ValueError(f"inject_fault: status {status} is not an HTTP error (400-599), nor 0 for a delay only")
        if count < 1 or delay < 0:
            raise ValueError(f"inject_fault: count must be >= 1 and delay >= 0 (got count={count}, delay={delay})")
        with self._lock:
            self._faults.append(_Fault(plural, verb, status, count, name, delay))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def drop_watches(self, plural: str | None = None) -> int:
        """End every open watch (of ``plural``) as a dropped connection would; returns how many. Clients
        resume from their last resourceVersion."""
        with self._lock:
            cut = [w for w in self._watchers if plural is None or w.res.plural == plural]
        for w in cut:
            w.loop.call_soon_threadsafe(w.queue.put_nowait, None)
        return len(cut)

    def compact(self, plural: str | None = None) -> None:
        """Forget the watch log (of ``plural``), as etcd compaction does: a watch resuming from any
        resourceVersion older than the newest gets ``410 Expired`` and must list again."""
        with self._lock:
            for r in RESOURCES:
                if plural is None or r.plural == plural:
                    log = self._logs[_key(r)]
                    log.events.clear()
                    log.oldest_rv = self._last_rv

    def drop_features(self, gates: Iterable[str]) -> None:
        """Emulate feature gates that are off: their fields are dropped from ResourceSlice writes and
        claim status writes, unless the stored object already uses them."""
        gates = set(gates)
        unknown = gates - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature gates {sorted(unknown)}; known: {FEATURES}")
        self._dropped = gates

    async def wait_for(self, predicate: Callable[["ApiServer"], Any], timeout: float = 10.0) -> Any:
        """Wait until ``predicate(server)`` is truthy (re-checked on every write); returns its value."""
        assert self._changed is not None, "start() the server first"
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                value = predicate(self)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("condition not met within %.1fs" % timeout)
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    pass

    # ---------------------------------------------------------------- Python store API
    def resource(self, plural: str, group: str | None = None) -> Resource:
        matches = [r for r in RESOURCES if r.plural == plural and (group is None or r.group == group)]
        if not matches:
            raise KeyError(f"unknown resource {plural!r}")
        return matches[0]

    def _res_of(self, obj: dict) -> Resource:
        api = obj.get("apiVersion", "")
        group, _, version = api.rpartition("/")
        for r in RESOURCES:
            if r.kind == obj.get("kind") and r.group == group and r.version == version:
                return r
        raise KeyError(f"unknown kind {obj.get('kind')} {api}")

    def create(self, obj: dict, *, keep_status: bool = True, field_validation: str = "Warn") -> dict:
        """Store a new object (status kept unless ``keep_status=False``, unlike HTTP create); unknown
        fields are dropped, or refused with ``field_validation="Strict"`` (what kubectl sends)."""
        res = self._res_of(obj)
        return self._create(res, obj.get("metadata", {}).get("namespace") or ("default" if res.namespaced else ""),
                            copy.deepcopy(obj), drop_status=not keep_status, field_validation=field_validation)

    def get(self, plural: str, name: str, namespace: str = "", group: str | None = None) -> dict | None:
        res = self.resource(plural, group)
        with self._lock:
            o = self._objs[_key(res)].get((namespace if res.namespaced else "", name))
            return copy.deepcopy(o) if o is not None else None

    def list(self, plural: str, namespace: str | None = None, group: str | None = None) -> list[dict]:
        res = self.resource(plural, group)
        with self._lock:
            return [copy.deepcopy(o) for (ns, _), o in sorted(self._objs[_key(res)].items())
                    if namespace is None or ns == namespace]

    def update(self, obj: dict) -> dict:
        res = self._res_of(obj)
        md = obj["metadata"]
        return self._replace(res, md.get("namespace", "") if res.namespaced else "", md["name"], copy.deepcopy(obj),
                             status=False, precondition=False)

    def update_status(self, obj: dict) -> dict:
        res = self._res_of(obj)
        md = obj["metadata"]
        return self._replace(res, md.get("namespace", "") if res.namespaced else "", md["name"], copy.deepcopy(obj),
                             status=True, precondition=False)

    def delete(self, plural: str, name: str, namespace: str = "", group: str | None = None) -> dict | None:
        res = self.resource(plural, group)
        return self._delete(res, namespace if res.namespaced else "", name, {})

    def bind(self, namespace: str, name: str, node: str) -> None:
        """The pods/binding subresource: assign a pending pod to a node (409 if already assigned)."""
        self._bind(namespace, name, {"target": {"kind": "Node", "name": node}})

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out (grows with every write)."""
        return self._last_rv

    async def changed(self, since: int, timeout: float) -> int:
        """Wait (at most ``timeout``) for any write after resourceVersion ``since``; returns the newest."""
        try:
            await self.wait_for(lambda s: s._last_rv > since, timeout)
        except TimeoutError:
            pass
        return self._last_rv

    # ---------------------------------------------------------------- core operations
    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _emit(self, res: Resource, etype: str, obj: dict, old: dict | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        log = self._logs[_key(res)]
        if len(log.events) == log.events.maxlen:
            log.oldest_rv = log.events[0][0]
        log.events.append((rv, etype, obj, old))
        for w in self._watchers:
            if w.res is res:
                w.loop.call_soon_threadsafe(w.queue.put_nowait, (rv, etype, obj, old))
        if self._loop is not None and self._changed is not None:
            try:
                self._loop.call_soon_threadsafe(self._notify)
            except RuntimeError:
                pass

    def _notify(self) -> None:
        async def go() -> None:
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()

        asyncio.ensure_future(go())

    def _create(self, res: Resource, ns: str, obj: dict, drop_status: bool, field_validation: str = "Warn") -> dict:
        with self._lock:
            md = obj.setdefault("metadata", {})
            if res.namespaced:
                md["namespace"] = ns
            else:
                md.pop("namespace", None)
            if not md.get("name"):
                if not md.get("generateName"):
                    raise ApiError(422, "Invalid", f"{res.kind}: metadata.name or metadata.generateName is required")
                table = self._objs[_key(res)]
                for _ in range(100):
                    cand = md["generateName"] + uuidlib.uuid4().hex[:5]
                    if (ns, cand) not in table:
                        md["name"] = cand
                        break
            k = (ns if res.namespaced else "", md["name"])
            if k in self._objs[_key(res)]:
                raise ApiError(409, "AlreadyExists", f'{res.plural} "{md["name"]}" already exists')
            obj["apiVersion"], obj["kind"] = res.api_version, res.kind
            if drop_status and res.plural in _STATUS_RESOURCES - _STATUS_KEPT_ON_CREATE:
                obj.pop("status", None)
            obj = _admit(res, obj, None, field_validation)
            md = obj["metadata"]
            if res.plural == "resourceslices":
                self._drop_slice_fields(obj, None)
            if res.plural == "pods":
                obj.setdefault("status", {}).setdefault("phase", "Pending")   # as the pod strategy does
            md["uid"] = str(uuidlib.uuid4())
            md["creationTimestamp"] = _now()
            md["generation"] = 1
            md.pop("deletionTimestamp", None)
            md["resourceVersion"] = self._next_rv()
            self._objs[_key(res)][k] = obj
            self._emit(res, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def _replace(self, res: Resource, ns: str, name: str, new: dict, *, status: bool, precondition: bool,
                 field_validation: str = "Warn") -> dict:
        with self._lock:
            table = self._objs[_key(res)]
            old = table.get((ns, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            new_md = new.get("metadata") or {}
            if precondition and new_md.get("resourceVersion") and new_md["resourceVersion"] != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {res.plural} "{name}": the object has '
                                                "been modified; please apply your changes to the latest version and try again")
            if status:
                merged = copy.deepcopy(old)
                merged["status"] = new.get("status")
                if merged["status"] is None:
                    merged.pop("status")
                if res.plural == "resourceclaims":
                    self._drop_claim_status_fields(old, merged)
                    self._validate_claim_status(old, merged)
                    validation.drop_deallocated_status_devices(merged, old)
                    try:
                        validation.validate_claim_status(merged)
                    except validation.Rejected as e:
                        raise ApiError(e.code, e.reason, e.message, e.details(name, res.group, res.kind)) from None
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
                if res.plural in _STATUS_RESOURCES:
                    if "status" in old:
                        merged["status"] = old["status"]
                    else:
                        merged.pop("status", None)
                merged["apiVersion"], merged["kind"] = res.api_version, res.kind
                merged = _admit(res, merged, old, field_validation)
                md = merged["metadata"]
                if old.get("spec") != merged.get("spec"):
                    md["generation"] = old["metadata"].get("generation", 1) + 1
                if res.plural == "resourceslices":
                    self._drop_slice_fields(merged, old)
            merged["apiVersion"], merged["kind"] = res.api_version, res.kind
            merged["metadata"]["resourceVersion"] = self._next_rv()
            if merged["metadata"].get("deletionTimestamp") and not merged["metadata"].get("finalizers"):
                del table[(ns, name)]
                self._emit(res, "DELETED", merged, old)
                self._collect_garbage(res, merged)
            else:
                table[(ns, name)] = merged
                self._emit(res, "MODIFIED", merged, old)
            return copy.deepcopy(merged)

    def _delete(self, res: Resource, ns: str, name: str, preconditions: dict) -> dict | None:
        with self._lock:
            table = self._objs[_key(res)]
            old = table.get((ns, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
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
            self._collect_garbage(res, gone)
            return gone

    def _collect_garbage(self, res: Resource, owner: dict) -> None:
        """Background GC of objects owned by a deleted object (by owner UID)."""
        uid = owner["metadata"].get("uid")
        for r in RESOURCES:
            for (ns, name), o in list(self._objs[_key(r)].items()):
                if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or []):
                    try:
                        self._delete(r, ns, name, {})
                    except ApiError:
                        pass

    # ---------------------------------------------------------------- validation and gates
    @staticmethod
    def _validate_claim_status(old: dict, new: dict) -> None:
        o_status, n_status = old.get("status") or {}, new.get("status") or {}
        o_alloc, n_alloc = o_status.get("allocation"), n_status.get("allocation")
        if o_alloc is not None and n_alloc is not None and o_alloc != n_alloc:
            raise ApiError(422, "Invalid", f'ResourceClaim.resource.k8s.io "{old["metadata"]["name"]}" is invalid: '
                                           "status.allocation: Invalid value: field is immutable")
        if n_status.get("reservedFor") and n_alloc is None:
            raise ApiError(422, "Invalid", f'ResourceClaim.resource.k8s.io "{old["metadata"]["name"]}" is invalid: '
                                           "status.reservedFor: Forbidden: may not be specified when `allocated` is not set")
        if old["metadata"].get("deletionTimestamp"):
            before = {r.get("uid") for r in o_status.get("reservedFor") or []}
            after = {r.get("uid") for r in n_status.get("reservedFor") or []}
            if after - before:
                raise ApiError(422, "Invalid", f'ResourceClaim.resource.k8s.io "{old["metadata"]["name"]}" is invalid: '
                                               "status.reservedFor: Forbidden: new entries may not be added while "
                                               "`deallocationRequested` or `deletionTimestamp` are set")

    def _drop_claim_status_fields(self, old: dict, new: dict) -> None:
        """With DRAConsumableCapacity off the API server drops shareID/consumedCapacity from results; with
        DRAResourceClaimDeviceStatus off, ``status.devices`` (dropDisabledDRAResourceClaimDeviceStatusFields),
        each unless the stored claim already uses it."""
        if "DRAResourceClaimDeviceStatus" in self._dropped and not (old.get("status") or {}).get("devices"):
            (new.get("status") or {}).pop("devices", None)
        if "DRAConsumableCapacity" not in self._dropped:
            return
        old_results = (((old.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []
        if any(r.get("shareID") for r in old_results):
            return
        for r in (((new.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []:
            r.pop("shareID", None)
            r.pop("consumedCapacity", None)

    def _drop_slice_fields(self, obj: dict, old: dict | None) -> None:
        if not self._dropped:
            return
        spec = obj.get("spec") or {}
        old_spec = (old or {}).get("spec") or {}
        old_devices = old_spec.get("devices") or []
        if "DRADeviceTaints" in self._dropped and not any(d.get("taints") for d in old_devices):
            for d in spec.get("devices") or []:
                d.pop("taints", None)
        if "DRAPartitionableDevices" in self._dropped and not (
                old_spec.get("sharedCounters") or any(d.get("consumesCounters") for d in old_devices)):
            spec.pop("sharedCounters", None)
            spec.pop("perDeviceNodeSelection", None)
            for d in spec.get("devices") or []:
                d.pop("consumesCounters", None)
        if "DRAConsumableCapacity" in self._dropped and not any(d.get("allowMultipleAllocations") for d in old_devices):
            for d in spec.get("devices") or []:
                d.pop("allowMultipleAllocations", None)
                for cap in (d.get("capacity") or {}).values():
                    cap.pop("requestPolicy", None)

    # ---------------------------------------------------------------- HTTP
    def _fault(self, plural: str, verb: str, name: str | None) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.plural == plural and f.verb == verb and (f.name is None or f.name == name) and f.count > 0:
                    f.count -= 1
                    if f.count == 0:
                        self._faults.remove(f)
                    return f
        return None

    async def _test_hook(self, request: web.Request, path: str) -> web.StreamResponse:
        """POST /_test/fault {plural, verb, status, count?, name?, delay?}, /_test/clear-faults,
        /_test/compact {plural?}, /_test/drop-watches {plural?}: the Python test hooks for a server run as
        a process (``--test-hooks``). Never served otherwise."""
        if not self._test_hooks or request.method != "POST":
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        raw = await request.read()
        body = json.loads(raw) if raw else {}
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", f"{path}: the body must be a JSON object")
        hook = path[len("/_test/"):]
        if hook == "fault":
            missing = [f for f in ("plural", "verb", "status") if f not in body]
            if missing:
                raise ApiError(400, "BadRequest", f"{path}: missing field(s) {missing}")
            self.inject_fault(body["plural"], body["verb"], int(body["status"]), int(body.get("count", 1)),
                              body.get("name"), float(body.get("delay", 0.0)))
            return web.json_response({"ok": True})
        if hook == "clear-faults":
            self.clear_faults()
            return web.json_response({"ok": True})
        if hook == "compact":
            self.compact(body.get("plural"))
            return web.json_response({"ok": True, "resourceVersion": str(self._last_rv)})
        if hook == "drop-watches":
            return web.json_response({"ok": True, "dropped": self.drop_watches(body.get("plural"))})
        raise ApiError(404, "NotFound", f"no test hook {hook!r}; known: fault, clear-faults, compact, drop-watches")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        path = "/" + request.match_info["tail"].strip("/")
        try:
            if path.startswith("/_test/"):
                return await self._test_hook(request, path)
            disc = self._discovery(path)
            if disc is not None:
                return web.json_response(disc)
            res, ns, name, sub = self._route(path)
            verb = self._verb(request.method, name, request.query)
            fault = self._fault(res.plural, verb, name)
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.status:
                code = fault.status
                raise ApiError(code, {409: "Conflict", 429: "TooManyRequests", 500: "InternalError",
                                      503: "ServiceUnavailable"}.get(code, "Unknown"), f"injected fault {code}")
            if verb == "watch":
                return await self._watch(request, res, ns)
            body = None
            if request.can_read_body:
                raw = await request.read()
                body = json.loads(raw) if raw else None
            status, obj = self._dispatch(request, verb, res, ns, name, sub, body)
            return web.json_response(obj, status=status)
        except ApiError as e:
            return web.json_response(e.status(), status=e.code)
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response(ApiError(400, "BadRequest", str(e)).status(), status=400)

    @staticmethod
    def _verb(method: str, name: str | None, query) -> str:  # noqa: ANN001
        if method == "GET":
            if query.get("watch") in ("true", "1"):
                return "watch"
            return "get" if name else "list"
        return {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())

    def _route(self, path: str) -> tuple[Resource, str, str | None, str | None]:
        parts = path.strip("/").split("/")
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in _BY_PATH:
            ns, rest = rest[1], rest[2:]
        if not rest or (group, version, rest[0]) not in _BY_PATH:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
        res = _BY_PATH[(group, version, rest[0])]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if sub is not None and sub not in res.subresources:
            raise ApiError(404, "NotFound", f"{res.plural} has no subresource {sub}")
        return res, ns, name, sub

    def _dispatch(self, request, verb, res, ns, name, sub, body):  # noqa: ANN001, ANN202, PLR0911
        q = request.query
        if verb == "get":
            with self._lock:
                o = self._objs[_key(res)].get((ns if res.namespaced else "", name))
                if o is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
                return 200, o
        if verb == "list":
            return 200, self._list(res, ns or None, q.get("labelSelector", ""), q.get("fieldSelector", ""))
        if verb == "create":
            if sub == "binding":
                return 201, self._bind(ns, name, body or {})
            if res.namespaced and not ns:
                ns = (body.get("metadata") or {}).get("namespace") or "default"
            return 201, self._create(res, ns, body, drop_status=True,
                                     field_validation=q.get("fieldValidation", "Warn"))
        if verb == "update":
            return 200, self._replace(res, ns if res.namespaced else "", name, body, status=sub == "status",
                                      precondition=True, field_validation=q.get("fieldValidation", "Warn"))
        if verb == "patch":
            return 200, self._patch(request.content_type, res, ns if res.namespaced else "", name, body,
                                    status=sub == "status")
        if verb == "delete":
            pre = (body or {}).get("preconditions") or {}
            return 200, self._delete(res, ns if res.namespaced else "", name, pre)
        if verb == "deletecollection":
            items = self._list(res, ns or None, q.get("labelSelector", ""), q.get("fieldSelector", ""))["items"]
            for o in items:
                try:
                    self._delete(res, o["metadata"].get("namespace", ""), o["metadata"]["name"], {})
                except ApiError:
                    pass
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
        raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported on {res.plural}")

    def _list(self, res: Resource, ns: str | None, label_selector: str, field_selector: str) -> dict:
        ls, fs = sel.LabelSelector.parse(label_selector), sel.FieldSelector.parse(field_selector)
        with self._lock:
            items = [o for (ons, _), o in sorted(self._objs[_key(res)].items())
                     if (ns is None or ons == ns) and ls.matches(o) and fs.matches(o)]
            return {"apiVersion": res.api_version, "kind": f"{res.kind}List",
                    "metadata": {"resourceVersion": str(self._last_rv)}, "items": items}

    def _patch(self, content_type: str, res: Resource, ns: str, name: str, body: Any, status: bool) -> dict:
        with self._lock:
            old = self._objs[_key(res)].get((ns, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            if content_type == "application/json-patch+json":
                try:
                    new = jsonpatch.apply_patch(old, body)
                except jsonpatch.JsonPatchTestFailed as e:
                    raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: {e}") from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    raise ApiError(422, "Invalid", str(e)) from None
                precondition = False
            else:   # merge-patch; strategic-merge-patch is treated as merge-patch
                new = _merge(copy.deepcopy(old), body)
                precondition = True   # a resourceVersion in the patch is a precondition
            return self._replace(res, ns, name, new, status=status, precondition=precondition)

    def _bind(self, ns: str, name: str, binding: dict) -> dict:
        res = self.resource("pods")
        with self._lock:
            pod = self._objs[_key(res)].get((ns, name))
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found')
            if (pod.get("spec") or {}).get("nodeName"):
                raise ApiError(409, "Conflict", f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"')
            target = (binding.get("target") or {}).get("name")
            if not target:
                raise ApiError(422, "Invalid", "Binding: target.name is required")
            new = copy.deepcopy(pod)
            new.setdefault("spec", {})["nodeName"] = target
            self._replace(res, ns, name, new, status=False, precondition=False)
            return {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}

    # ---------------------------------------------------------------- watch
    async def _watch(self, request: web.Request, res: Resource, ns: str) -> web.StreamResponse:
        q = request.query
        ls, fs = sel.LabelSelector.parse(q.get("labelSelector", "")), sel.FieldSelector.parse(q.get("fieldSelector", ""))
        timeout = float(q.get("timeoutSeconds", 1800))
        bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
        rv_text = q.get("resourceVersion", "")
        send_initial = q.get("sendInitialEvents") in ("true", "1")
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        w = _Watcher(res, ns or None, ls, fs, asyncio.Queue(), loop)

        def visible(o: dict | None) -> bool:
            return o is not None and (w.namespace is None or o["metadata"].get("namespace") == w.namespace) and \
                ls.matches(o) and fs.matches(o)

        async def send(etype: str, obj: dict) -> None:
            await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        with self._lock:
            self._watchers.append(w)
            backlog: list[tuple[int, str, dict, dict | None]] = []
            initial: list[dict] = []
            log = self._logs[_key(res)]
            start_rv = self._last_rv
            if rv_text in ("", "0") or send_initial:
                initial = [copy.deepcopy(o) for (ons, _), o in sorted(self._objs[_key(res)].items()) if visible(o)]
            else:
                rv = int(rv_text)
                if log.oldest_rv and rv < log.oldest_rv:
                    expired = True
                else:
                    expired = False
                    backlog = [e for e in log.events if e[0] > rv]
        try:
            if rv_text not in ("", "0") and not send_initial and expired:
                await send("ERROR", ApiError(410, "Expired", f"too old resource version: {rv_text} "
                                                             f"({log.oldest_rv})").status())
                return resp
            for o in initial:
                await send("ADDED", o)
            if send_initial:
                await send("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version, "metadata": {
                    "resourceVersion": str(start_rv), "annotations": {"k8s.io/initial-events-end": "true"}}})
            seen = start_rv if initial or send_initial else 0
            deadline = loop.time() + timeout
            pending = list(backlog)
            while True:
                if pending:
                    item = pending.pop(0)
                else:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(w.queue.get(), min(left, self._bookmark))
                    except asyncio.TimeoutError:
                        if bookmarks and loop.time() < deadline:
                            await send("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version,
                                                    "metadata": {"resourceVersion": str(self._last_rv)}})
                        continue
                    if item is None:
                        break
                rv, etype, obj, old = item
                if rv <= seen:
                    continue
                now_in, was_in = visible(obj), visible(old)
                if etype == "ADDED" and now_in:
                    await send("ADDED", obj)
                elif etype == "MODIFIED":
                    if now_in and was_in:
                        await send("MODIFIED", obj)
                    elif now_in:
                        await send("ADDED", obj)
                    elif was_in:
                        await send("DELETED", obj)
                elif etype == "DELETED" and (was_in or now_in):
                    await send("DELETED", obj)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                if w in self._watchers:
                    self._watchers.remove(w)
        return resp

    # ---------------------------------------------------------------- discovery
    @staticmethod
    def _group(group: str) -> dict:
        versions = sorted({r.version for r in RESOURCES if r.group == group}, key=lambda v: (v != "v1", v))
        return {"name": group, "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]}}

    def _discovery(self, path: str) -> dict | None:
        if path in ("/version",):
            return {"major": "1", "minor": "36", "gitVersion": "v1.36.0-partita-sandbox", "gitCommit": "sandbox",
                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "none",
                    "compiler": "none", "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups = sorted({r.group for r in RESOURCES if r.group})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [self._group(g) for g in groups]}
        if path.count("/") == 2 and path.startswith("/apis/"):
            group = path.split("/")[2]
            if any(r.group == group for r in RESOURCES):
                return {"kind": "APIGroup", "apiVersion": "v1", **self._group(group)}
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) == 2:
            group, version = "", parts[1]
        elif parts[0] == "apis" and len(parts) == 3:
            group, version = parts[1], parts[2]
        else:
            return None
        rs = [r for r in RESOURCES if r.group == group and r.version == version]
        if not rs:
            raise ApiError(404, "NotFound", f"no API group version {path}")
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        out = []
        for r in rs:
            out.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced, "kind": r.kind,
                        "verbs": verbs})
            for s in r.subresources:
                out.append({"name": f"{r.plural}/{s}", "singularName": "", "namespaced": r.namespaced,
                            "kind": "Binding" if s == "binding" else r.kind,
                            "verbs": ["create"] if s == "binding" else ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": out}


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = _merge(target.get(k), v)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.sandbox.apiserver [--port N]``: serve an empty emulated API until killed
    (benchmarks run it in a process of its own; handy for trying clients). Prints the URL first."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m controller.sandbox.apiserver", description=main.__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch BOOKMARKs")
    p.add_argument("--test-hooks", action="store_true",
                   help="serve POST /_test/{fault,clear-faults,compact,drop-watches} (chaos tests)")
    args = p.parse_args(argv)

    async def serve() -> None:
        server = ApiServer(port=args.port, bookmark_interval=args.bookmark_interval, test_hooks=args.test_hooks)
        url = await server.start()
        print(url, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
