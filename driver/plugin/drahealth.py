"""KEP-4680: the kubelet's device health stream, ``DRAResourceHealth.NodeWatchResources``, on the DRA socket.

What the kubelet does with it (kubernetes/kubernetes pkg/kubelet/cm/dra: ``HandleWatchResourcesStream``,
healthinfo.go; notes in /work/shared/reference/notes/kubelet-plugin-protocol.md §2.4):

* it opens the stream on the plugin's DRA endpoint once the plugin is registered, and again 5 s after it
  ends or fails; newer kubelets only when a health service is listed in the registration's
  ``supported_versions`` (``v1.DRAResourceHealth`` preferred over ``v1alpha1.DRAResourceHealth``), older
  ones (1.34-1.36, feature gate ResourceHealthStatus) always, and only v1alpha1 — so both are served
  (the messages are wire-identical; only the package differs) and both are advertised;
* every message is the complete list of the driver's devices it cares about (keyed by pool and device);
  a device not re-reported within ``health_check_timeout_seconds`` (30 s when 0) turns Unknown; the cache
  is cleared when the stream ends;
* a changed device makes the kubelet update the pods that use it:
  ``status.containerStatuses[].allocatedResourcesStatus[]`` (resourceID = the first CDI device ID).

So the stream sends, per prepared device (claim -> devices from the checkpoint), its health: at once,
on every change of any device's health, on every prepare/unprepare seen, and every ``resend_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable

import grpc

from driver.api.messages import bound
from driver.kubeletapi.drahealth.v1 import api_pb2 as pb
from driver.kubeletapi.drahealth.v1 import api_pb2_grpc as pb_grpc
from driver.plugin.checkpoint import CheckpointError
from driver.plugin.healthmon import HealthView
from driver.plugin.prepare import DeviceState

log = logging.getLogger(__name__)

SERVICE_V1 = "v1.DRAResourceHealth"
SERVICE_V1ALPHA1 = "v1alpha1.DRAResourceHealth"
#: registration strings (they are the gRPC service names)
VERSIONS = [SERVICE_V1, SERVICE_V1ALPHA1]
#: the kubelet shows the message, at most 1024 characters
MAX_HEALTH_MESSAGE = 1024


class ResourceHealth(pb_grpc.DRAResourceHealthServicer):
    def __init__(self, state: DeviceState, view: Callable[[], HealthView], *, resend_seconds: float = 10.0,
                 timeout_seconds: int = 30, clock: Callable[[], float] = time.time):
        self.state = state
        self._view = view
        self.resend_seconds = resend_seconds
        self.timeout_seconds = timeout_seconds
        self._clock = clock
        self._streams: set[asyncio.Event] = set()    # one wake-up per open stream

    @property
    def streams(self) -> int:
        return len(self._streams)

    def notify(self, _view: HealthView | None = None) -> None:
        """Health or the prepared claims changed: every open stream sends a new list."""
        for wake in self._streams:
            wake.set()

    def snapshot(self) -> pb.NodeWatchResourcesResponse | None:
        """The health of every prepared device; None when the checkpoint cannot be read (nothing is sent)."""
        try:
            claims = self.state.prepared_claims()
        except CheckpointError as e:
            log.warning("health stream: %s", e)
            return None
        view = self._view()
        now = int(self._clock())
        resp = pb.NodeWatchResourcesResponse()
        seen: set[tuple[str, str]] = set()
        for uid in sorted(claims):
            entry = claims[uid]
            if entry.state != "Prepared":
                continue
            for d in entry.devices:
                if (d.pool, d.device) in seen:
                    continue
                seen.add((d.pool, d.device))
                h = view.device(d.gpu_uuid, d.device)
                message = "" if h.healthy else bound(f"{h.state}: {h.reason}", MAX_HEALTH_MESSAGE)
                resp.devices.add(device=pb.DeviceIdentifier(pool_name=d.pool, device_name=d.device),
                                 health=pb.HEALTHY if h.healthy else pb.UNHEALTHY, last_updated_time=now,
                                 health_check_timeout_seconds=self.timeout_seconds, message=message)
        return resp

    async def NodeWatchResources(self, request, context) -> AsyncIterator[pb.NodeWatchResourcesResponse]:  # noqa: N802,ANN001
        wake = asyncio.Event()
        self._streams.add(wake)
        log.info("the kubelet opened the device health stream")
        loop = asyncio.get_running_loop()
        try:
            last: bytes | None = None
            last_sent = 0.0
            while True:
                wake.clear()
                resp = self.snapshot()
                if resp is not None:
                    stable = _stable(resp)
                    # an unchanged list is sent again only as a keep-alive, well inside the kubelet's timeout
                    if stable != last or loop.time() - last_sent >= self.resend_seconds:
                        yield resp
                        last, last_sent = stable, loop.time()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=self.resend_seconds)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._streams.discard(wake)


def _stable(resp: pb.NodeWatchResourcesResponse) -> bytes:
    """The response without its timestamps: what tells a change from a keep-alive."""
    c = pb.NodeWatchResourcesResponse()
    c.CopyFrom(resp)
    for d in c.devices:
        d.last_updated_time = 0
    return c.SerializeToString(deterministic=True)


def add_to_server(svc: ResourceHealth, server: grpc.aio.Server) -> None:
    """Serve the health stream as v1 and as v1alpha1 (same messages on the wire)."""
    pb_grpc.add_DRAResourceHealthServicer_to_server(svc, server)
    handlers = {"NodeWatchResources": grpc.unary_stream_rpc_method_handler(
        svc.NodeWatchResources, request_deserializer=pb.NodeWatchResourcesRequest.FromString,
        response_serializer=pb.NodeWatchResourcesResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_V1ALPHA1, handlers),))
