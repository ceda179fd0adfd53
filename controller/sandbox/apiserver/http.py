"""The HTTP layer (k8s.io/apiserver pkg/endpoints): one catch-all route that answers discovery, the test
hooks, or a resource request: path -> (resource, namespace, name, subresource), method -> verb, injected
faults, then the verb on the store. Errors answer as ``Status`` objects."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import eviction, patch, pods
from . import selectors as sel
from .discovery import discovery
from .errors import ApiError, not_found
from .faults import REASONS
from .resources import BY_PATH, Resource
from .watch import serve_watch

if TYPE_CHECKING:
    from .server import ApiServer


def application(server: "ApiServer") -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _handle(server, request)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _handle(server: "ApiServer", request: web.Request) -> web.StreamResponse:
    server.requests += 1
    path = "/" + request.match_info["tail"].strip("/")
    try:
        if path.startswith("/_test/"):
            return await _test_hook(server, request, path)
        disc = discovery(path)
        if disc is not None:
            return web.json_response(disc)
        res, ns, name, sub = route(path)
        verb = verb_of(request.method, name, request.query)
        fault = server.faults.take(res.plural, verb, name)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.status:
            code = fault.status
            raise ApiError(code, REASONS.get(code, "Unknown"), f"injected fault {code}")
        if verb == "watch":
            return await serve_watch(request, server.store, res, ns, server.bookmark_interval)
        body = None
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        status, obj = _dispatch(server, request, verb, res, ns, name, sub, body)
        return web.json_response(obj, status=status)
    except ApiError as e:
        return web.json_response(e.status(), status=e.code)
    except (ValueError, KeyError, TypeError) as e:
        return web.json_response(ApiError(400, "BadRequest", str(e)).status(), status=400)


def verb_of(method: str, name: str | None, query: Any) -> str:
    if method == "GET":
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())


def route(path: str) -> tuple[Resource, str, str | None, str | None]:
    """``/api/v1/namespaces/ns/pods/name/status`` -> (pods, "ns", "name", "status")."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    ns = ""
    if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in BY_PATH:
        ns, rest = rest[1], rest[2:]
    if not rest or (group, version, rest[0]) not in BY_PATH:
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({path})")
    res = BY_PATH[(group, version, rest[0])]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if sub is not None and sub not in res.subresources:
        raise ApiError(404, "NotFound", f"{res.plural} has no subresource {sub}")
    return res, ns, name, sub


def _selected(res: Resource, ns: str, q: Any) -> tuple[str | None, sel.LabelSelector, sel.FieldSelector]:
    return ns or None, sel.LabelSelector.parse(q.get("labelSelector", "")), sel.FieldSelector.parse(
        q.get("fieldSelector", ""))


def _dispatch(server: "ApiServer", request: web.Request, verb: str, res: Resource, ns: str, name: str | None,
              sub: str | None, body: Any) -> tuple[int, Any]:  # noqa: PLR0911
    store, q = server.store, request.query
    scoped = ns if res.namespaced else ""
    if verb == "get":
        with store.lock:
            o = store.peek(res, ns, name or "")
            if o is None:
                raise not_found(res.plural, name or "")
            return 200, o
    if verb == "list":
        return 200, store.list(res, *_selected(res, ns, q))
    if verb == "create":
        if sub == "binding":
            return 201, pods.bind(store, ns, name or "", body or {})
        if sub == "eviction":
            return eviction.evict(store, ns, name or "", body, q)
        if res.namespaced and not ns:
            ns = (body.get("metadata") or {}).get("namespace") or "default"
        return 201, store.create(res, ns, body, drop_status=True, field_validation=q.get("fieldValidation", "Warn"))
    if verb == "update":
        return 200, store.replace(res, scoped, name or "", body, status=sub == "status", precondition=True,
                                  field_validation=q.get("fieldValidation", "Warn"))
    if verb == "patch":
        with store.lock:
            old = store.peek(res, scoped, name or "")
            if old is None:
                raise not_found(res.plural, name or "")
            new, precondition = patch.apply(request.content_type, old, body)
            return 200, store.replace(res, scoped, name or "", new, status=sub == "status", precondition=precondition)
    if verb == "delete":
        pre = (body or {}).get("preconditions") or {}
        return 200, store.delete(res, scoped, name or "", pre)
    if verb == "deletecollection":
        for o in store.list(res, *_selected(res, ns, q))["items"]:
            try:
                store.delete(res, o["metadata"].get("namespace", ""), o["metadata"]["name"], {})
            except ApiError:
                pass
        return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
    raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported on {res.plural}")


async def _test_hook(server: "ApiServer", request: web.Request, path: str) -> web.StreamResponse:
    """POST /_test/fault {plural, verb, status, count?, name?, delay?}, /_test/clear-faults,
    /_test/compact {plural?}, /_test/drop-watches {plural?}: the Python test hooks for a server run as
    a process (``--test-hooks``). Never served otherwise."""
    if not server.test_hooks or request.method != "POST":
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
        server.inject_fault(body["plural"], body["verb"], int(body["status"]), int(body.get("count", 1)),
                            body.get("name"), float(body.get("delay", 0.0)))
        return web.json_response({"ok": True})
    if hook == "clear-faults":
        server.clear_faults()
        return web.json_response({"ok": True})
    if hook == "compact":
        server.compact(body.get("plural"))
        return web.json_response({"ok": True, "resourceVersion": str(server.resource_version)})
    if hook == "drop-watches":
        return web.json_response({"ok": True, "dropped": server.drop_watches(body.get("plural"))})
    raise ApiError(404, "NotFound", f"no test hook {hook!r}; known: fault, clear-faults, compact, drop-watches")
