"""The controller process (``partita controller``): flags, leader election, kopf, health and metrics.

In-process entry for the sandbox and tests: :func:`run_controller`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

import kopf
from aiohttp import web

from controller.allocator import STRATEGIES
from driver.api import constants as C
from driver.api.kube import Kube
from driver.cliopts import add_cluster, add_log_level

from . import metrics
from .controller import Controller, ControllerConfig
from .handlers import build_registry
from .leader import LeaderElector
from .taintrules import GROUP, PLURAL, discover_version

log = logging.getLogger("controller.operator")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--driver-name", default=_env("DRIVER_NAME", C.DEFAULT_DRIVER_NAME),
                   help="DRA driver whose claims this controller allocates (env DRIVER_NAME)")
    p.add_argument("--allocation-mode", choices=C.ALLOCATION_MODES,
                   default=_env("ALLOCATION_MODE", C.ALLOCATION_MODE_CONTROLLER),
                   help="controller: allocate Partita claims; scheduler: only validate and report (env ALLOCATION_MODE)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default=_env("ALLOCATION_STRATEGY", "pack"),
                   help="device choice: pack (default) or first-fit, identical to kube-scheduler (env ALLOCATION_STRATEGY)")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction,
                   default=_env("LEADER_ELECT", "true").lower() in ("1", "true", "yes"),
                   help="elect one active controller through a Lease (env LEADER_ELECT)")
    p.add_argument("-n", "--namespace", "--leader-election-namespace", dest="leader_election_namespace",
                   default=_env("POD_NAMESPACE", "") or None,
                   help="namespace of the Lease (env POD_NAMESPACE; default: the kubeconfig context's, else default)")
    p.add_argument("--leader-election-id", default=_env("LEADER_ELECTION_ID", "partita-controller"),
                   help="name of the Lease (env LEADER_ELECTION_ID)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8080")),
                   help="Prometheus metrics port, -1 = off (env METRICS_PORT)")
    p.add_argument("--health-port", type=int, default=int(_env("HEALTH_PORT", "8081")),
                   help="HTTP /healthz and /readyz port, -1 = off (env HEALTH_PORT)")
    add_cluster(p, kube_api_default=os.environ.get("KUBE_API_URL"), namespace=False,
                kube_api_help="plain-HTTP API server URL (sandbox, tests); default in-cluster, then kubeconfig "
                              "(env KUBE_API_URL)")
    add_log_level(p, _env("LOG_LEVEL", "INFO"), "log level (env LOG_LEVEL)")


def quiet_kopf(level: str) -> None:
    """kopf logs every handler run at INFO; keep its per-object chatter for DEBUG."""
    if level != "DEBUG":
        for name in ("kopf.objects", "kopf._core.reactor.running", "kopf._core.engines.activities",
                     "kopf._core.reactor.activities"):
            logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class Running:
    controller: Controller
    leader: LeaderElector | None


async def run_controller(cfg: ControllerConfig, stop: asyncio.Event, *, kube_api: str | None = None,
                         leader_election: tuple[str, str] | None = None, ready: asyncio.Event | None = None,
                         started: list | None = None, kubeconfig: str | None = None,
                         context: str | None = None) -> int:
    """Run the controller until ``stop`` (or until leadership is lost: returns 1)."""
    kube = await Kube.connect(kube_api, kubeconfig=kubeconfig, context=context)
    # kopf connects as our client does when the flags name a kubeconfig or context (its own login cannot)
    connection = kube.connection if (kubeconfig or context) and not kube_api else None
    if leader_election is not None and not leader_election[0]:
        leader_election = (kube.namespace, leader_election[1])
    controller = Controller(cfg, kube)
    elector = None
    try:
        if started is not None:
            started.append(Running(controller, None))
        if leader_election is not None:
            elector = LeaderElector(kube, *leader_election)
            if started is not None:
                started[-1].leader = elector
            if not await elector.acquire(stop):
                return 0
        metrics.IS_LEADER.set(1)
        rules_version = await discover_version(kube)
        registry = build_registry(controller, kube_api, (("devicetaintrule", GROUP, rules_version, PLURAL),)
                                  if rules_version else (), connection=connection)
        kopf_stop = asyncio.Event()
        kopf_ready = asyncio.Event()
        operator = asyncio.create_task(kopf.operator(registry=registry, standalone=True, clusterwide=True,
                                                     stop_flag=kopf_stop, ready_flag=kopf_ready))
        worker = asyncio.create_task(controller.run(kopf_stop))
        keeper = asyncio.create_task(elector.keep(stop)) if elector else None
        await kopf_ready.wait()
        controller.synced = True
        if ready is not None:
            ready.set()
        waits = {asyncio.create_task(stop.wait()), operator}
        if keeper is not None:
            waits.add(keeper)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        lost = keeper is not None and keeper in done and not stop.is_set()
        kopf_stop.set()
        for t in waits:
            if t not in done and t is not operator:
                t.cancel()
        await asyncio.gather(operator, worker, return_exceptions=True)
        if keeper is not None and not keeper.done():
            keeper.cancel()
        if elector is not None and not lost:
            await elector.release()
        metrics.IS_LEADER.set(0)
        if lost:
            log.error("lost leadership; exiting so that the Deployment restarts this instance")
            return 1
        return 0
    finally:
        await kube.close()


async def _health(port: int, running: list) -> web.AppRunner:
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        ok = bool(running) and (running[-1].controller.synced or (running[-1].leader is not None
                                                                   and not running[-1].leader.is_leader))
        return web.Response(text="ok" if ok else "not ready", status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def run(args: argparse.Namespace) -> int:
    level = str(args.log_level).upper()
    logging.getLogger().setLevel(level)
    quiet_kopf(level)
    cfg = ControllerConfig(driver_name=args.driver_name, allocation_mode=args.allocation_mode, strategy=args.strategy)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        running: list = []
        health = await _health(args.health_port, running) if args.health_port >= 0 else None
        if args.metrics_port >= 0:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port)
        try:
            election = (args.leader_election_namespace, args.leader_election_id) if args.leader_elect else None
            return await run_controller(cfg, stop, kube_api=args.kube_api, leader_election=election, started=running,
                                        kubeconfig=args.kubeconfig, context=args.context)
        finally:
            if health is not None:
                await health.cleanup()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace()))
