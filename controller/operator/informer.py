"""List-and-watch of one resource into the controller's cache (client-go's reflector semantics, our own code).

* The first list is applied as one step, then ``synced`` is True: the controller allocates nothing until
  every informer is synced (an allocation decided on half a list can hand out a device another claim holds).
* A watch resumes from the last resourceVersion seen (events and BOOKMARKs). When the server answers
  ``410 Gone/Expired`` the informer lists again and the list *replaces* what it knew: an object absent from
  the new list is delivered as DELETED (its last known state), exactly as if the watch had shown the delete;
  an object recreated under the same name (another uid) is delivered as DELETED then ADDED.
* Every ``resync`` seconds it lists again the same way (a periodic re-list, so the cache converges even if
  an event was lost some other way).
* Errors (connection refused, 5xx, a dropped stream) are retried with backoff from the last resourceVersion;
  nothing already applied is undone.

Kopf's watches were not used for this: its handlers cannot tell when the initial listing is over, and its
re-list after 410 never reports the objects deleted in the gap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

from driver.api.kube import Kube, KubeError
from driver.errors import PartitaError

log = logging.getLogger(__name__)

Deliver = Callable[[str, str, dict], None]       # (kind, event type, object)


@dataclass(frozen=True)
class Watched:
    kind: str            # the cache's name for it: pod, claim, slice, deviceclass, node, ...
    group: str           # "" for core
    version: str
    plural: str

    @property
    def path(self) -> str:
        return f"/api/{self.version}/{self.plural}" if not self.group else f"/apis/{self.group}/{self.version}/{self.plural}"


class Expired(PartitaError):
    """The server no longer has the events after our resourceVersion (410): list again."""


def _ident(obj: dict) -> tuple[str, str]:
    md = obj.get("metadata") or {}
    return md.get("namespace", ""), md.get("name", "")


def _rv(obj: dict) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Informer:
    def __init__(self, kube: Kube, watched: Watched, deliver: Deliver, *, resync: float = 300.0,
                 watch_timeout: int = 240, retry_min: float = 0.2, retry_max: float = 10.0):
        if resync <= 0:
            raise ValueError(f"informer {watched.plural}: resync must be > 0 seconds (got {resync})")
        self.kube = kube
        self.watched = watched
        self.deliver = deliver
        self.resync = resync
        self.watch_timeout = watch_timeout
        self.retry_min, self.retry_max = retry_min, retry_max
        self.known: dict[tuple[str, str], dict] = {}
        self.synced = False
        self.lists = 0                      # lists applied (first list, 410s and resyncs)
        self.synced_event = asyncio.Event()

    # -- applying -------------------------------------------------------------------------------
    def _emit(self, etype: str, obj: dict) -> None:
        try:
            self.deliver(self.watched.kind, etype, obj)
        except Exception:  # noqa: BLE001 - one bad object must not stop the watch
            log.exception("handling %s %s %s/%s failed", etype, self.watched.kind, *_ident(obj))

    def apply_event(self, etype: str, obj: dict) -> None:
        k = _ident(obj)
        if etype == "DELETED":
            self.known.pop(k, None)
            self._emit("DELETED", obj)
            return
        old = self.known.get(k)
        if old is not None and (old.get("metadata") or {}).get("uid") != (obj.get("metadata") or {}).get("uid"):
            self.known.pop(k, None)
            self._emit("DELETED", old)      # recreated under the same name: the old one is gone
            old = None
        self.known[k] = obj
        self._emit("ADDED" if old is None else "MODIFIED", obj)

    def replace(self, items: list[dict]) -> None:
        """Apply a full list: what it lacks was deleted; what changed is modified."""
        fresh = {_ident(o): o for o in items}
        for k, old in list(self.known.items()):
            if k not in fresh:
                del self.known[k]
                log.info("%s %s/%s was deleted while the watch was down; handling it as a delete",
                         self.watched.kind, *k)
                self._emit("DELETED", old)
        for k, o in fresh.items():
            old = self.known.get(k)
            if old is not None and _rv(old) == _rv(o) and \
                    (old.get("metadata") or {}).get("uid") == (o.get("metadata") or {}).get("uid"):
                continue                     # unchanged
            self.apply_event("ADDED", o)
        self.lists += 1
        if not self.synced:
            self.synced = True
            self.synced_event.set()

    # -- the loop -------------------------------------------------------------------------------
    async def _list(self) -> str:
        data = await self.kube.list(self.watched.path)
        self.replace(list(data.get("items") or []))
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, rv: str, timeout: int) -> str:
        async for ev in self.kube.watch(self.watched.path, resource_version=rv, timeout_seconds=timeout):
            etype, obj = ev.get("type"), ev.get("object") or {}
            if etype == "ERROR":
                if obj.get("code") == 410:
                    raise Expired(obj.get("message", "resource version too old"))
                raise KubeError.of(int(obj.get("code") or 500), obj.get("reason", ""), obj.get("message", ""),
                                   "WATCH", self.watched.path)
            if etype == "BOOKMARK":
                rv = _rv(obj) or rv
                continue
            if etype in ("ADDED", "MODIFIED", "DELETED"):
                self.apply_event(etype, obj)
                rv = _rv(obj) or rv
        return rv

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        rv: str | None = None
        listed_at = 0.0
        delay = self.retry_min
        while not stop.is_set():
            try:
                if rv is None or loop.time() - listed_at >= self.resync:
                    rv = await self._list()
                    listed_at = loop.time()
                left = self.resync - (loop.time() - listed_at)
                rv = await self._watch(rv, max(1, min(self.watch_timeout, int(left) + 1)))
                delay = self.retry_min
            except Expired as e:
                log.info("watch of %s expired (%s); listing again", self.watched.plural, e)
                rv = None
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.status == 410:
                    rv = None
                    continue
                log.warning("watch of %s failed: %s; retrying in %.1fs", self.watched.plural, e, delay)
                await self._pause(stop, delay)
                delay = min(delay * 2, self.retry_max)
            except Exception as e:  # noqa: BLE001 - connection errors of any kind: resume later
                log.warning("watch of %s failed: %r; retrying in %.1fs", self.watched.plural, e, delay)
                await self._pause(stop, delay)
                delay = min(delay * 2, self.retry_max)

    @staticmethod
    async def _pause(stop: asyncio.Event, seconds: float) -> None:
        try:
            await asyncio.wait_for(stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass


class Informers:
    """One informer per watched resource, all delivering into one callback."""

    def __init__(self, kube: Kube, watched: tuple[Watched, ...], deliver: Deliver, *, resync: float = 300.0):
        self.all = [Informer(kube, w, deliver, resync=resync) for w in watched]

    @property
    def synced(self) -> bool:
        return all(i.synced for i in self.all)

    def unsynced(self) -> list[str]:
        return [i.watched.plural for i in self.all if not i.synced]

    async def wait_synced(self) -> None:
        await asyncio.gather(*(i.synced_event.wait() for i in self.all))

    def by_kind(self, kind: str) -> Informer:
        return next(i for i in self.all if i.watched.kind == kind)

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(i.run(stop) for i in self.all))
