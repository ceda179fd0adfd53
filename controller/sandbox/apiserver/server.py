"""``ApiServer``: the emulator's lifecycle (aiohttp on 127.0.0.1, in the running loop or a thread of its
own), its Python store API (thread-safe, hands out copies) and its test hooks."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any, Callable, Iterable

from aiohttp import web

from . import pods
from .faults import Faults
from .gates import FeatureGates
from .http import application
from .resources import Resource, resource_named, resource_of
from .store import Store
from .watch import end_watches


class ApiServer:
    def __init__(self, *, bookmark_interval: float = 5.0, log_size: int = 4096, port: int = 0,
                 test_hooks: bool = False):
        self.gates = FeatureGates()
        self.store = Store(log_size=log_size, gates=self.gates, on_write=self._on_write)
        self.faults = Faults()
        self.bookmark_interval = bookmark_interval
        self.test_hooks = test_hooks     # serve POST /_test/{fault,compact,drop-watches} (a process's tests)
        self._port = port
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
        self._runner = web.AppRunner(application(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        end_watches(self.store)
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
        self.faults.add(plural, verb, status, count, name, delay)

    def clear_faults(self) -> None:
        self.faults.clear()

    def drop_watches(self, plural: str | None = None) -> int:
        """End every open watch (of ``plural``) as a dropped connection would; returns how many. Clients
        resume from their last resourceVersion."""
        return end_watches(self.store, plural)

    @property
    def open_watches(self) -> int:
        """How many watches are open now."""
        with self.store.lock:
            return len(self.store.watchers)

    def compact(self, plural: str | None = None) -> None:
        """Forget the watch log (of ``plural``), as etcd compaction does: a watch resuming from any
        resourceVersion older than the newest gets ``410 Expired`` and must list again."""
        self.store.compact(plural)

    def drop_features(self, gates: Iterable[str]) -> None:
        """Emulate feature gates that are off: their fields are dropped from ResourceSlice writes and
        claim status writes, unless the stored object already uses them."""
        self.gates.turn_off(gates)

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

    def _on_write(self) -> None:
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

    # ---------------------------------------------------------------- Python store API
    @staticmethod
    def resource(plural: str, group: str | None = None) -> Resource:
        return resource_named(plural, group)

    def create(self, obj: dict, *, keep_status: bool = True, field_validation: str = "Warn") -> dict:
        """Store a new object (status kept unless ``keep_status=False``, unlike HTTP create); unknown
        fields are dropped, or refused with ``field_validation="Strict"`` (what kubectl sends)."""
        res = resource_of(obj)
        return self.store.create(res, obj.get("metadata", {}).get("namespace") or ("default" if res.namespaced else ""),
                                 copy.deepcopy(obj), drop_status=not keep_status, field_validation=field_validation)

    def get(self, plural: str, name: str, namespace: str = "", group: str | None = None) -> dict | None:
        res = resource_named(plural, group)
        with self.store.lock:
            o = self.store.peek(res, namespace, name)
            return copy.deepcopy(o) if o is not None else None

    def list(self, plural: str, namespace: str | None = None, group: str | None = None) -> list[dict]:
        res = resource_named(plural, group)
        with self.store.lock:
            return [copy.deepcopy(o) for o in self.store.items(res, namespace)]

    def update(self, obj: dict) -> dict:
        return self._write(obj, status=False)

    def update_status(self, obj: dict) -> dict:
        return self._write(obj, status=True)

    def _write(self, obj: dict, *, status: bool) -> dict:
        res = resource_of(obj)
        md = obj["metadata"]
        return self.store.replace(res, md.get("namespace", "") if res.namespaced else "", md["name"],
                                  copy.deepcopy(obj), status=status, precondition=False)

    def delete(self, plural: str, name: str, namespace: str = "", group: str | None = None) -> dict | None:
        res = resource_named(plural, group)
        return self.store.delete(res, namespace if res.namespaced else "", name, {})

    def bind(self, namespace: str, name: str, node: str) -> None:
        """The pods/binding subresource: assign a pending pod to a node (409 if already assigned)."""
        pods.bind(self.store, namespace, name, {"target": {"kind": "Node", "name": node}})

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out (grows with every write)."""
        return self.store.resource_version

    async def changed(self, since: int, timeout: float) -> int:
        """Wait (at most ``timeout``) for any write after resourceVersion ``since``; returns the newest."""
        try:
            await self.wait_for(lambda s: s.resource_version > since, timeout)
        except TimeoutError:
            pass
        return self.resource_version
