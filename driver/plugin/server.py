"""The kubelet-facing gRPC servers on unix sockets: DRA v1 and v1beta1, and plugin registration.

The DRA socket is served first, then the registration socket, so the kubelet never sees a
registration whose endpoint is not served yet. Stale sockets are removed before binding and both are
removed on stop (removing the registration socket is how the kubelet learns the plugin is gone) -- but
only while they are still the files this instance bound: with fixed names a newer instance on the node
may have replaced them, and removing its sockets would deregister it (driver/plugin/sockets.py). gRPC
itself unlinks a unix socket's path when its server stops, so a replaced path is kept under a hidden
hard link (the kubelet's plugin watcher ignores names starting with '.') while the server stops, and put
back: the newer instance's sockets are missing for that moment only, instead of for good.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from driver.api.messages import MAX_MESSAGE, MIN_MESSAGE, bound
from driver.errors import Result
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubeletapi.dra.v1beta1 import api_pb2 as v1beta1
from driver.kubeletapi.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc
from driver.kubeletapi.pluginregistration.v1 import api_pb2 as reg
from driver.kubeletapi.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from driver.plugin import metrics
from driver.plugin.claims import ClaimSource, check_claim_ref, check_claim_shape
from driver.plugin.observers import Observers, notify_prepared, notify_unprepared
from driver.plugin.prepare import ClaimRef, DeviceState, PreparedResult, PrepareError

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
PLUGIN_TYPE = "DRAPlugin"
#: the kubelet's gRPC client receives at most 4 MiB (grpc-go's default); a larger answer fails every
#: claim in the call, so the errors are shortened until the whole response fits below this
MAX_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024


def bound_errors(resp, errors: dict[str, str]) -> None:  # noqa: ANN001 - a v1 or v1beta1 response
    """Set each claim's error in ``resp.claims``, each at most MAX_MESSAGE bytes, and shorter still when
    that would make the response exceed MAX_RESPONSE_BYTES."""
    failed = {uid: e for uid, e in errors.items() if e}
    for uid, e in failed.items():
        resp.claims[uid].error = bound(e, MAX_MESSAGE)
    size = resp.ByteSize()
    if size <= MAX_RESPONSE_BYTES or not failed:
        return
    error_bytes = sum(len(resp.claims[uid].error.encode()) for uid in failed)
    room = MAX_RESPONSE_BYTES - (size - error_bytes)
    limit = max(MIN_MESSAGE, room // len(failed) - 8)      # 8: the length prefix grows less than this
    for uid, e in failed.items():
        resp.claims[uid].error = bound(e, limit)
    if resp.ByteSize() > MAX_RESPONSE_BYTES:
        log.error("the response for %d claims is %d bytes even with each error cut to %d bytes; the kubelet "
                  "may refuse it", len(resp.claims), resp.ByteSize(), limit)


class DraService:
    """NodePrepareResources / NodeUnprepareResources, shared by the v1 and v1beta1 servicers."""

    def __init__(self, state: DeviceState, claims: ClaimSource, observers: Observers | None = None):
        self.state = state
        self.claims = claims
        #: claim status, usage metrics, idle detection (driver/plugin/observers.py); never fail a call
        self.observers = observers or Observers()
        self.on_change: Callable[[], None] | None = None    # after every prepare/unprepare (health stream)

    async def _fetch(self, ref: ClaimRef) -> Result[dict]:
        """The claim the kubelet names, read only when its names are valid, and checked for the fields
        Prepare reads; else why this claim cannot be prepared."""
        try:
            check_claim_ref(ref)
            claim = await self.claims.get(ref)
            check_claim_shape(ref, claim)
            return Result.ok(claim)
        except PrepareError as e:
            log.warning("prepare of claim %s (uid %s) failed: %s", ref, ref.uid, e)
            return Result.failed(str(e))
        except Exception as e:  # noqa: BLE001 - a bug reading one claim must not fail the others
            log.exception("reading claim %s (uid %s) failed unexpectedly", ref, ref.uid)
            return Result.failed(f"claim {ref}: internal error: {e}")

    async def prepare(self, request, pb):  # noqa: ANN001 - v1 or v1beta1 messages
        start = time.perf_counter()
        refs = [ClaimRef(c.namespace, c.name, c.uid) for c in request.claims]
        fetched: list[Result[dict]] = []
        if refs:
            with self.state.arriving():     # a batch about to start waits for these claims
                fetched = await asyncio.gather(*(self._fetch(r) for r in refs))
        results = await self.state.prepare([(r, f.value) for r, f in zip(refs, fetched) if f.value is not None])
        results.update({r.uid: PreparedResult(error=f.error) for r, f in zip(refs, fetched) if f.error is not None})
        notify_prepared(self.observers, self.state, refs, [f.value for f in fetched], results)
        resp = pb.NodePrepareResourcesResponse()
        errors: dict[str, str] = {}
        for ref in refs:
            res = results[ref.uid]
            out = resp.claims[ref.uid]
            if res.error:
                errors[ref.uid] = res.error
                metrics.PREPARE_ERRORS.inc()
                continue
            for d in res.devices:
                dev = out.devices.add(request_names=d.request_names, pool_name=d.pool, device_name=d.device,
                                      cdi_device_ids=d.cdi_device_ids)
                if d.share_id and pb is v1:
                    dev.share_id = d.share_id
        bound_errors(resp, errors)
        metrics.PREPARE_SECONDS.observe(time.perf_counter() - start)
        metrics.PREPARED_CLAIMS.set(self.state.prepared_count)
        if self.on_change is not None:
            self.on_change()
        return resp

    async def unprepare(self, request, pb):  # noqa: ANN001
        start = time.perf_counter()
        refs = [ClaimRef(c.namespace, c.name, c.uid) for c in request.claims]
        errors = await self.state.unprepare(refs)
        notify_unprepared(self.observers, refs, errors)
        resp = pb.NodeUnprepareResourcesResponse()
        for ref in refs:
            resp.claims[ref.uid].error = ""
            if errors.get(ref.uid):
                metrics.UNPREPARE_ERRORS.inc()
        bound_errors(resp, errors)
        metrics.UNPREPARE_SECONDS.observe(time.perf_counter() - start)
        metrics.PREPARED_CLAIMS.set(self.state.prepared_count)
        if self.on_change is not None:
            self.on_change()
        return resp


class DraV1(v1_grpc.DRAPluginServicer):
    def __init__(self, svc: DraService):
        self.svc = svc

    async def NodePrepareResources(self, request, context):  # noqa: N802,ANN001
        return await self.svc.prepare(request, v1)

    async def NodeUnprepareResources(self, request, context):  # noqa: N802,ANN001
        return await self.svc.unprepare(request, v1)


class DraV1beta1(v1beta1_grpc.DRAPluginServicer):
    def __init__(self, svc: DraService):
        self.svc = svc

    async def NodePrepareResources(self, request, context):  # noqa: N802,ANN001
        return await self.svc.prepare(request, v1beta1)

    async def NodeUnprepareResources(self, request, context):  # noqa: N802,ANN001
        return await self.svc.unprepare(request, v1beta1)


class Registration(reg_grpc.RegistrationServicer):
    def __init__(self, driver_name: str, endpoint: str, extra_versions: list[str] | None = None):
        self.driver_name = driver_name
        self.endpoint = endpoint
        self.versions = SUPPORTED_VERSIONS + list(extra_versions or [])
        self.status: reg.RegistrationStatus | None = None

    async def GetInfo(self, request, context):  # noqa: N802,ANN001
        return reg.PluginInfo(type=PLUGIN_TYPE, name=self.driver_name, endpoint=self.endpoint,
                              supported_versions=self.versions)

    async def NotifyRegistrationStatus(self, request, context):  # noqa: N802,ANN001
        self.status = request
        if request.plugin_registered:
            log.info("the kubelet registered the DRA plugin %s (endpoint %s)", self.driver_name, self.endpoint)
            return reg.RegistrationStatusResponse()
        log.error("the kubelet refused to register the DRA plugin %s: %s", self.driver_name, request.error)
        await context.abort(grpc.StatusCode.UNKNOWN, f"failed registration process: {request.error}")


def _health_versions() -> list[str]:
    from driver.plugin.drahealth import VERSIONS

    return VERSIONS


def _remove_socket(path: Path) -> None:
    try:
        if path.is_socket() or path.exists():
            os.unlink(path)
    except FileNotFoundError:
        pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _keep_if_replaced(path: Path, identity: tuple[int, int] | None) -> Path | None:
    """When ``path`` is no longer the socket this instance bound, hard-link it under a hidden name (the
    caller puts it back once gRPC has unlinked ``path``); returns that name."""
    now = _identity(path)
    if now is None or now == identity:
        return None
    keep = path.with_name(f".{path.name}.keep-{os.getpid()}")
    try:
        _remove_socket(keep)
        os.link(path, keep)
    except OSError as e:
        log.warning("%s belongs to another instance now, and stopping will remove it (cannot keep it: %s)", path, e)
        return None
    log.info("%s belongs to another instance now (it replaced ours); keeping it", path)
    return keep


def _restore(keep: Path | None, path: Path) -> None:
    if keep is not None:
        try:
            os.replace(keep, path)
        except OSError as e:
            log.error("could not put the other instance's socket back at %s: %s", path, e)


class PluginServers:
    """Owns the two unix-socket servers."""

    def __init__(self, svc: DraService, *, driver_name: str, dra_socket: Path, registration_socket: Path,
                 health: Any = None):
        self.svc = svc
        self.dra_socket = dra_socket
        self.registration_socket = registration_socket
        self.health = health       # a driver.plugin.drahealth.ResourceHealth: the kubelet's health stream (KEP-4680)
        self.registration = Registration(driver_name, str(dra_socket), _health_versions() if health else None)
        self._dra: grpc.aio.Server | None = None
        self._reg: grpc.aio.Server | None = None
        self._bound: dict[Path, tuple[int, int] | None] = {}    # socket -> (device, inode) this instance bound

    async def start(self) -> None:
        for p in (self.dra_socket, self.registration_socket):
            p.parent.mkdir(parents=True, exist_ok=True)
            _remove_socket(p)
        self._dra = grpc.aio.server()
        v1_grpc.add_DRAPluginServicer_to_server(DraV1(self.svc), self._dra)
        v1beta1_grpc.add_DRAPluginServicer_to_server(DraV1beta1(self.svc), self._dra)
        if self.health is not None:
            from driver.plugin.drahealth import add_to_server

            add_to_server(self.health, self._dra)
        self._dra.add_insecure_port(f"unix://{self.dra_socket}")
        await self._dra.start()
        self._bound[self.dra_socket] = _identity(self.dra_socket)
        log.info("serving DRA v1 and v1beta1 on %s", self.dra_socket)
        self._reg = grpc.aio.server()
        reg_grpc.add_RegistrationServicer_to_server(self.registration, self._reg)
        self._reg.add_insecure_port(f"unix://{self.registration_socket}")
        await self._reg.start()
        self._bound[self.registration_socket] = _identity(self.registration_socket)
        log.info("serving plugin registration on %s", self.registration_socket)

    async def stop(self, grace: float = 2.0) -> None:
        # Registration first: the kubelet deregisters as soon as that socket is gone.
        for server, path in ((self._reg, self.registration_socket), (self._dra, self.dra_socket)):
            keep = _keep_if_replaced(path, self._bound.get(path))
            if server is not None:
                await server.stop(grace)
            if keep is not None:
                _restore(keep, path)
            else:
                _remove_socket(path)
