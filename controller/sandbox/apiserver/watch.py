"""The watch endpoint (k8s.io/apiserver pkg/endpoints/handlers/watch.go): JSON lines, initial ADDED events,
resume from the store's bounded log, ``410 Expired`` as an ERROR event when too old, BOOKMARKs,
``timeoutSeconds``, selectors with ADDED/DELETED when an object enters or leaves them,
``sendInitialEvents`` with the ``k8s.io/initial-events-end`` bookmark."""

from __future__ import annotations

import asyncio
import copy
import json

from aiohttp import web

from . import selectors as sel
from .errors import ApiError
from .resources import Resource
from .store import Event, Store, Watcher


async def serve_watch(request: web.Request, store: Store, res: Resource, ns: str,
                      bookmark_interval: float) -> web.StreamResponse:
    q = request.query
    ls, fs = sel.LabelSelector.parse(q.get("labelSelector", "")), sel.FieldSelector.parse(q.get("fieldSelector", ""))
    timeout = float(q.get("timeoutSeconds", 1800))
    bookmarks = q.get("allowWatchBookmarks") in ("true", "1")
    rv_text = q.get("resourceVersion", "")
    send_initial = q.get("sendInitialEvents") in ("true", "1")
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    w = Watcher(res, ns or None, ls, fs, asyncio.Queue(), loop)

    def visible(o: dict | None) -> bool:
        return o is not None and (w.namespace is None or o["metadata"].get("namespace") == w.namespace) and \
            ls.matches(o) and fs.matches(o)

    async def send(etype: str, obj: dict) -> None:
        await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

    with store.lock:
        store.watchers.append(w)
        backlog: list[Event] = []
        initial: list[dict] = []
        log = store.log(res)
        start_rv = store.resource_version
        expired = False
        if rv_text in ("", "0") or send_initial:
            initial = [copy.deepcopy(o) for o in store.items(res) if visible(o)]
        else:
            rv = int(rv_text)
            if log.oldest_rv and rv < log.oldest_rv:
                expired = True
            else:
                backlog = [e for e in log.events if e[0] > rv]
    try:
        if expired:
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
                    item = await asyncio.wait_for(w.queue.get(), min(left, bookmark_interval))
                except asyncio.TimeoutError:
                    if bookmarks and loop.time() < deadline:
                        await send("BOOKMARK", {"kind": res.kind, "apiVersion": res.api_version,
                                                "metadata": {"resourceVersion": str(store.resource_version)}})
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
        with store.lock:
            if w in store.watchers:
                store.watchers.remove(w)
    return resp


def end_watches(store: Store, plural: str | None = None) -> int:
    """End every open watch (of ``plural``) as a dropped connection would; returns how many."""
    with store.lock:
        cut = [w for w in store.watchers if plural is None or w.res.plural == plural]
    for w in cut:
        w.loop.call_soon_threadsafe(w.queue.put_nowait, None)
    return len(cut)
