"""Liveness for the DaemonSet's gRPC probe: a grpc.health.v1 service (service names "" and
"liveness") that answers SERVING only when GetInfo on the registration socket and an empty
NodePrepareResources on the DRA socket both succeed — the plugin as the kubelet sees it."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubeletapi.pluginregistration.v1 import api_pb2 as reg
from driver.kubeletapi.pluginregistration.v1 import api_pb2_grpc as reg_grpc

log = logging.getLogger(__name__)


async def check_sockets(dra_socket: Path, registration_socket: Path, timeout: float = 2.0) -> str:
    """"" when both sockets answer, else what failed."""
    try:
        async with grpc.aio.insecure_channel(f"unix://{registration_socket}") as ch:
            await reg_grpc.RegistrationStub(ch).GetInfo(reg.InfoRequest(), timeout=timeout)
        async with grpc.aio.insecure_channel(f"unix://{dra_socket}") as ch:
            await v1_grpc.DRAPluginStub(ch).NodePrepareResources(v1.NodePrepareResourcesRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details()}"
    return ""


class Liveness(health_pb2_grpc.HealthServicer):
    def __init__(self, dra_socket: Path, registration_socket: Path):
        self._dra = dra_socket
        self._reg = registration_socket

    async def Check(self, request, context):  # noqa: N802,ANN001
        if request.service not in ("", "liveness"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        problem = await check_sockets(self._dra, self._reg)
        if problem:
            log.warning("liveness check failed: %s", problem)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def start_health_server(port: int, dra_socket: Path, registration_socket: Path) -> grpc.aio.Server:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Liveness(dra_socket, registration_socket), server)
    server.add_insecure_port(f"0.0.0.0:{port}")
    await server.start()
    return server
