"""The controller process (``partita controller``): flags, leader election, informers, health and metrics.

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

from aiohttp import web

from controller.allocator import STRATEGIES
from controller.queuepolicy import PolicyError, QueueSettings
from driver.api import constants as C
from driver.api.kube import Kube
from driver.cliopts import add_cluster, add_log_level
from driver.logfmt import add_log_format

from . import metrics
from .controller import Controller, ControllerConfig
from .extendedresources import parse_names
from .handlers import build_informers
from .idlepolicy import IdleSettings, parse_classes
from .informer import Watched
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
    p.add_argument("--leader-identity", default=os.environ.get("POD_NAME"),
                   help="this instance's name in the Lease (env POD_NAME; default hostname plus a random suffix)")
    p.add_argument("--leader-lease-duration", type=float, default=float(_env("LEADER_LEASE_DURATION", "15")),
                   help="seconds a standby waits after the lease last changed before taking it (env LEADER_LEASE_DURATION)")
    p.add_argument("--leader-renew-deadline", type=float, default=float(_env("LEADER_RENEW_DEADLINE", "10")),
                   help="the leader writes nothing once this long has passed since its last successful renew; "
                        "must be below the lease duration (env LEADER_RENEW_DEADLINE)")
    p.add_argument("--leader-retry-period", type=float, default=float(_env("LEADER_RETRY_PERIOD", "2")),
                   help="seconds between renew and acquire attempts (env LEADER_RETRY_PERIOD)")
    p.add_argument("--resync-seconds", type=float, default=float(_env("RESYNC_SECONDS", "300")),
                   help="every watch lists again this often; the list replaces the cache (env RESYNC_SECONDS)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8080")),
                   help="Prometheus metrics port, -1 = off (env METRICS_PORT)")
    p.add_argument("--health-port", type=int, default=int(_env("HEALTH_PORT", "8081")),
                   help="HTTP /healthz and /readyz port, -1 = off (env HEALTH_PORT)")
    add_cluster(p, kube_api_default=os.environ.get("KUBE_API_URL"), namespace=False,
                kube_api_help="plain-HTTP API server URL (sandbox, tests); default in-cluster, then kubeconfig "
                              "(env KUBE_API_URL)")
    p.add_argument("--extended-resource-names", default=_env("EXTENDED_RESOURCE_NAMES", "nvidia.com/gpu"),
                   help="comma-separated extended resources (the NVIDIA device plugin's) whose pending pods get an "
                        "Event saying to use a ResourceClaim instead, see docs/migration.md (env EXTENDED_RESOURCE_NAMES)")
    q = p.add_argument_group("queue policy (docs/queue.md)")
    q.add_argument("--queue-reserve-after", type=float, default=float(_env("QUEUE_RESERVE_AFTER", "300")),
                   help="seconds a pod waits before GPUs are reserved for it (env QUEUE_RESERVE_AFTER)")
    q.add_argument("--queue-max-reservations", type=int, default=int(_env("QUEUE_MAX_RESERVATIONS", "1")),
                   help="pods holding reservations at once, largest first; 0 = off (env QUEUE_MAX_RESERVATIONS)")
    q.add_argument("--queue-reserve-min-gpus", type=float, default=float(_env("QUEUE_RESERVE_MIN_GPUS", "2")),
                   help="only pods needing this many GPUs or more get reservations (env QUEUE_RESERVE_MIN_GPUS)")
    i = p.add_argument_group("idle policy (docs/monitoring.md section 3; off by default)")
    i.add_argument("--idle-policy", choices=("off", "on"), default=_env("IDLE_POLICY", "off"),
                   help="on: act on pods of idle claims where a Namespace label gpu.partita.dev/idle-policy or "
                        "--idle-policy-classes asks for it (env IDLE_POLICY)")
    i.add_argument("--idle-policy-classes", default=_env("IDLE_POLICY_CLASSES", ""),
                   help="CLASS=annotate|evict,...: the action for pods whose claims use these DeviceClasses; a "
                        "namespace's label wins (env IDLE_POLICY_CLASSES)")
    i.add_argument("--idle-policy-grace", type=float, default=float(_env("IDLE_POLICY_GRACE", "300")),
                   help="seconds a claim must have been reported idle before anything is done (env IDLE_POLICY_GRACE)")
    i.add_argument("--idle-policy-priority-below", type=int, default=int(_env("IDLE_POLICY_PRIORITY_BELOW", "1")),
                   help="only pods whose spec.priority is below this (env IDLE_POLICY_PRIORITY_BELOW)")
    i.add_argument("--idle-policy-max-evictions-per-minute", type=int,
                   default=int(_env("IDLE_POLICY_MAX_EVICTIONS_PER_MINUTE", "2")),
                   help="evictions in any minute, at most (env IDLE_POLICY_MAX_EVICTIONS_PER_MINUTE)")
    i.add_argument("--idle-policy-dry-run", action=argparse.BooleanOptionalAction,
                   default=_env("IDLE_POLICY_DRY_RUN", "false").lower() in ("1", "true", "yes"),
                   help="only report (Events PartitaIdlePolicyDryRun, logs, metrics) (env IDLE_POLICY_DRY_RUN)")
    i.add_argument("--idle-policy-include-gangs", action=argparse.BooleanOptionalAction,
                   default=_env("IDLE_POLICY_INCLUDE_GANGS", "false").lower() in ("1", "true", "yes"),
                   help="act on pods of gangs and Jobs too (env IDLE_POLICY_INCLUDE_GANGS)")
    i.add_argument("--idle-policy-interval", type=float, default=float(_env("IDLE_POLICY_INTERVAL", "30")),
                   help="seconds between evaluations (env IDLE_POLICY_INTERVAL)")
    add_log_level(p, _env("LOG_LEVEL", "INFO"), "log level (env LOG_LEVEL)")
    add_log_format(p)


def quiet_kopf(level: str) -> None:
    """kopf logs every handler run at INFO; keep its per-object chatter for DEBUG (the controller's own
    watches no longer use kopf; this only quiets kopf where something else in the process runs it)."""
    if level != "DEBUG":
        for name in ("kopf.objects", "kopf._core.reactor.running", "kopf._core.engines.activities",
                     "kopf._core.reactor.activities"):
            logging.getLogger(name).setLevel(logging.WARNING)


def idle_settings(args: argparse.Namespace) -> IdleSettings:
    """The idle policy's flags; IdlePolicyError (a ValueError) naming the setting."""
    return IdleSettings(enabled=args.idle_policy == "on", classes=parse_classes(args.idle_policy_classes),
                        grace_seconds=args.idle_policy_grace, priority_below=args.idle_policy_priority_below,
                        max_evictions_per_minute=args.idle_policy_max_evictions_per_minute,
                        dry_run=args.idle_policy_dry_run, include_gangs=args.idle_policy_include_gangs,
                        interval_seconds=args.idle_policy_interval)


@dataclass
class Running:
    controller: Controller
    leader: LeaderElector | None


async def run_controller(cfg: ControllerConfig, stop: asyncio.Event, *, kube_api: str | None = None,
                         leader_election: tuple[str, str] | None = None, ready: asyncio.Event | None = None,
                         started: list | None = None, identity: str | None = None,
                         kubeconfig: str | None = None, context: str | None = None) -> int:
    """Run the controller until ``stop`` (or until leadership is lost: returns 1).

    Order: win the lease, start the informers, and only once every one has applied its first list start
    deciding (``ready`` is set then). On loss the worker is cancelled at once and the lease is not
    touched again."""
    kube = await Kube.connect(kube_api, kubeconfig=kubeconfig, context=context)
    if leader_election is not None and not leader_election[0]:
        leader_election = (kube.namespace, leader_election[1])
    controller = Controller(cfg, kube)
    elector = None
    try:
        if started is not None:
            started.append(Running(controller, None))
        if leader_election is not None:
            elector = LeaderElector(kube, *leader_election, identity=identity, lease_seconds=cfg.lease_duration,
                                    renew_deadline=cfg.renew_deadline, retry_seconds=cfg.retry_period)
            if started is not None:
                started[-1].leader = elector
            if not await elector.acquire(stop):
                return 0
            controller.fence = elector
        metrics.IS_LEADER.set(1)
        rules_version = await discover_version(kube)
        informers = build_informers(controller, kube, (Watched("devicetaintrule", GROUP, rules_version, PLURAL),)
                                    if rules_version else ())
        controller.informers = informers
        inner = asyncio.Event()
        watching = asyncio.create_task(informers.run(inner))
        worker = asyncio.create_task(controller.run(inner))
        keeper = asyncio.create_task(elector.keep(stop)) if elector else None
        stopping = asyncio.create_task(stop.wait())
        synced = asyncio.create_task(informers.wait_synced())
        ends = {stopping, worker, watching} | ({keeper} if keeper else set())
        done, _ = await asyncio.wait(ends | {synced}, return_when=asyncio.FIRST_COMPLETED)
        if synced in done and not (done & ends):
            controller.synced = True
            log.info("every watch has listed (%s); allocating", ", ".join(i.watched.plural for i in informers.all))
            if ready is not None:
                ready.set()
            done, _ = await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        lost = not stop.is_set() and (controller.lost or (keeper is not None and keeper in done)
                                      or (elector is not None and elector.lost.is_set()))
        if lost:
            worker.cancel()          # at once: not one more write
        inner.set()
        watching.cancel()
        for t in (stopping, synced, keeper):
            if t is not None and not t.done():
                t.cancel()
        await asyncio.gather(worker, watching, stopping, synced, *([keeper] if keeper else []), return_exceptions=True)
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
    cfg = ControllerConfig(driver_name=args.driver_name, allocation_mode=args.allocation_mode, strategy=args.strategy,
                           resync_seconds=args.resync_seconds, lease_duration=args.leader_lease_duration,
                           renew_deadline=args.leader_renew_deadline, retry_period=args.leader_retry_period)
    try:
        cfg.extended_resource_names = parse_names(args.extended_resource_names)
        cfg.queue = QueueSettings(reserve_after=args.queue_reserve_after, max_reservations=args.queue_max_reservations,
                                  reserve_min=args.queue_reserve_min_gpus)
    except ValueError as e:         # PolicyError names the setting; prefixed with the flag's name
        log.error("%s", e if not isinstance(e, PolicyError) else f"--queue-{e}")
        return 2
    try:
        cfg.idle = idle_settings(args)
    except ValueError as e:         # IdlePolicyError names the setting
        log.error("--idle-policy-%s", e)
        return 2

    if args.leader_elect and not 0 < args.leader_retry_period < args.leader_renew_deadline < args.leader_lease_duration:
        log.error("leader election: need 0 < --leader-retry-period (%s) < --leader-renew-deadline (%s) < "
                  "--leader-lease-duration (%s)", args.leader_retry_period, args.leader_renew_deadline,
                  args.leader_lease_duration)
        return 2
    if args.resync_seconds <= 0:
        log.error("--resync-seconds must be > 0 (got %s)", args.resync_seconds)
        return 2

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
                                        identity=args.leader_identity, kubeconfig=args.kubeconfig,
                                        context=args.context)
        finally:
            if health is not None:
                await health.cleanup()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace()))
