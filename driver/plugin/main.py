"""The kubelet plugin process (``partita plugin``): flags, start-up order, signals, shutdown.

Start-up: socket names (fixed, or per instance for rolling updates with surge: driver/plugin/sockets.py)
-> NVML backend -> inventory -> undo interrupted prepares -> ResourceSlice publisher -> DRA gRPC
socket -> registration socket (the kubelet registers the plugin as soon as that one appears) -> health
and metrics. The GPU health monitor (docs/health.md) starts with the publisher: it taints failing devices,
feeds the kubelet's health stream on the DRA socket and sets the health metrics. SIGTERM/SIGINT stop the servers and remove both sockets; ResourceSlices stay (the kubelet
wipes them if the plugin does not come back).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from driver import logfmt
from driver.api import constants as C
from driver.api.kube import InvalidName, Kube, KubeError, check_name, node_path
from driver.cliopts import add_cluster, add_log_level, connect
from driver.errors import PartitaError
from driver.logfmt import add_log_format
from driver.inventory import discover
from driver.nvml import BACKENDS, NvmlError, ProfileError, load_profile, open_backend
from driver.plugin import cdi
from driver.plugin.claims import ClaimGone, KubeClaimSource
from driver.plugin.healthsetup import HealthFlagError, add_health_arguments, events_file, health_config, wire_health
from driver.plugin.devicestatus import DeviceStatusWriter
from driver.plugin.mps_watch import watch_mps_daemons
from driver.plugin.telemetry import add_observer_arguments, start_observers
from driver.plugin.nodelabels import follow_node_labels
from driver.plugin.prepare import ClaimRef, DeviceState, PrepareError
from driver.plugin.server import DraService, PluginServers
from driver.plugin.sockets import (MIN_KUBELET, InstanceUidError, SocketPaths, check_instance_uid,
                                   kubelet_supports_instances, socket_paths)
from driver.publisher import SlicePublisher
from driver.slices import SliceFeatures

log = logging.getLogger("driver.plugin")
ROLLING_UPDATE_MODES = ("auto", "on", "off")
#: how long start-up waits for the Node (its kubelet version) under --rolling-update auto/on
NODE_READ_TIMEOUT = 10.0


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-name", default=_env("NODE_NAME"), help="this node's name (env NODE_NAME; required)")
    p.add_argument("--driver-name", default=_env("DRIVER_NAME", C.DEFAULT_DRIVER_NAME),
                   help="DRA driver name (env DRIVER_NAME; default %(default)s)")
    p.add_argument("--nvml", choices=BACKENDS, default=_env("NVML_BACKEND", "real"),
                   help="NVML backend: real GPUs, or fake GPUs from --fake-profile (env NVML_BACKEND)")
    p.add_argument("--nvidia-driver-root", default=_env("NVIDIA_DRIVER_ROOT") or "",
                   help="--nvml real: the directory a driver installed outside / is mounted at (the GPU "
                        "Operator's driver container); libnvidia-ml.so.1 is loaded from under it (env "
                        "NVIDIA_DRIVER_ROOT; default: the container's library path)")
    p.add_argument("--fake-profile", default=_env("FAKE_GPU_PROFILE"),
                   help="FakeGpuProfile file for --nvml fake (env FAKE_GPU_PROFILE)")
    p.add_argument("--fake-state-dir", default=_env("FAKE_GPU_STATE_DIR"),
                   help="where fake GPUs keep MIG instances etc. across restarts (env FAKE_GPU_STATE_DIR; "
                        "default <plugin data dir>/fake-nvml)")
    p.add_argument("--cdi-root", default=_env("CDI_ROOT", "/var/run/cdi"), help="CDI spec directory (env CDI_ROOT)")
    p.add_argument("--kubelet-registrar-directory-path",
                   default=_env("KUBELET_REGISTRAR_DIRECTORY_PATH", "/var/lib/kubelet/plugins_registry"),
                   help="kubelet plugin registration directory (env KUBELET_REGISTRAR_DIRECTORY_PATH)")
    p.add_argument("--kubelet-plugins-directory-path",
                   default=_env("KUBELET_PLUGINS_DIRECTORY_PATH", "/var/lib/kubelet/plugins"),
                   help="kubelet plugins directory; the plugin's data directory is <this>/<driver> "
                        "(env KUBELET_PLUGINS_DIRECTORY_PATH)")
    p.add_argument("--allocation-mode", choices=C.ALLOCATION_MODES,
                   default=_env("ALLOCATION_MODE", C.ALLOCATION_MODE_CONTROLLER),
                   help="controller: devices carry Partita's taint so only its controller allocates them; "
                        "scheduler: kube-scheduler allocates (env ALLOCATION_MODE)")
    add_cluster(p, kube_api_default=_env("KUBE_API_URL"), namespace=False,
                kube_api_help="plain-HTTP API server URL (sandbox, tests); default: in-cluster, then kubeconfig "
                              "(env KUBE_API_URL)")
    p.add_argument("--health-port", type=int, default=int(_env("HEALTH_PORT", "51515") or 51515),
                   help="gRPC health (service 'liveness') port, -1 = off (env HEALTH_PORT)")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8080") or 8080),
                   help="Prometheus metrics port, -1 = off (env METRICS_PORT)")
    p.add_argument("--metrics-address", default=_env("METRICS_ADDRESS") or "127.0.0.1",
                   help="IP address to serve metrics on (env METRICS_ADDRESS; default %(default)s; the chart "
                        "sets the pod IP; 0.0.0.0 serves every interface)")
    add_log_level(p, _env("LOG_LEVEL", "INFO"), "log level (env LOG_LEVEL)")
    add_log_format(p)
    p.add_argument("--mps-check-interval", type=float, default=float(_env("MPS_CHECK_INTERVAL", "10") or 10),
                   help="seconds between checks that the MPS control daemons prepared MPS shares use are running "
                        "(one that died with a stopped plugin container is started again); 0 = off (env "
                        "MPS_CHECK_INTERVAL; default %(default)s)")
    add_observer_arguments(p, _env)
    p.add_argument("--instance-uid", default=_env("POD_UID") or "",
                   help="this instance's uid, the pod's UID (env POD_UID, from the downward API metadata.uid); "
                        "with --rolling-update it becomes part of both socket names")
    p.add_argument("--rolling-update", choices=ROLLING_UPDATE_MODES, default=_env("ROLLING_UPDATE", "auto"),
                   help="per-instance socket names <driver>-<uid>-reg.sock and dra-<uid>.sock, so an old and a "
                        "new instance serve side by side during a DaemonSet rollout with surge (needs kubelet "
                        "1.33+). auto: on when --instance-uid is set and this Node's kubelet is 1.33 or newer; "
                        "on: always (refused when the Node's kubelet is known to be older); off: fixed names, "
                        "one instance per node (env ROLLING_UPDATE; default %(default)s)")
    add_health_arguments(p)


def run(args: argparse.Namespace) -> int:
    logfmt.configure(getattr(args, "log_format", "text"), args.log_level, node=args.node_name or "")
    if not args.node_name:
        print("partita plugin: --node-name (or NODE_NAME) is required; in the DaemonSet it comes from "
              "spec.nodeName through the downward API", file=sys.stderr)
        return 2
    try:
        check_name(args.node_name, "--node-name (NODE_NAME)")
        check_name(args.driver_name, "--driver-name (DRIVER_NAME)")
        if getattr(args, "instance_uid", ""):
            check_instance_uid(args.instance_uid)
        if getattr(args, "rolling_update", "off") == "on" and not args.instance_uid:
            raise InstanceUidError("--rolling-update on needs --instance-uid (env POD_UID; the chart sets it from "
                                   "the pod's metadata.uid)")
    except (InvalidName, InstanceUidError) as e:
        print(f"partita plugin: {e}", file=sys.stderr)
        return 2
    try:
        health_config(args)
    except HealthFlagError as e:
        print(f"partita plugin: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args))
    except StartupError as e:
        print(f"partita plugin: {e}", file=sys.stderr)
        return 1


class StartupError(PartitaError):
    pass


def _open_backend(args: argparse.Namespace, plugin_dir: Path):
    if args.nvml == "fake":
        if not args.fake_profile:
            raise StartupError("--nvml fake needs --fake-profile FILE (env FAKE_GPU_PROFILE)")
        try:
            profile = load_profile(args.fake_profile)
            profile.node(args.node_name)
        except ProfileError as e:
            raise StartupError(str(e)) from None
        state_dir = Path(args.fake_state_dir) if args.fake_state_dir else plugin_dir / "fake-nvml"
        backend = open_backend("fake", profile=profile, node_name=args.node_name, state_dir=state_dir,
                               events_file=events_file(args, state_dir))
    elif getattr(args, "nvidia_driver_root", ""):
        from driver.nvml.real import RealNvml

        backend = RealNvml(driver_root=args.nvidia_driver_root)
    else:
        backend = open_backend("real")
    try:
        backend.init()
    except NvmlError as e:
        raise StartupError(str(e)) from None
    return backend


async def cleanup_stale_claims(state: DeviceState, claims: KubeClaimSource) -> None:
    """Unprepare claims in the checkpoint that no longer exist (deleted while the plugin was down), so
    MIG instances created for them do not linger."""
    stale = []
    for uid, entry in state.prepared_claims().items():
        ref = ClaimRef(entry.namespace, entry.name, uid)
        try:
            claim = await claims.get(ref)
        except ClaimGone:
            stale.append(ref)
            continue
        except PrepareError:
            continue
        if claim.get("metadata", {}).get("uid") != uid:
            stale.append(ref)
    if stale:
        errors = await state.unprepare(stale)
        for ref in stale:
            log.info("released claim %s (uid %s), which no longer exists%s", ref, ref.uid,
                     f": {errors[ref.uid]}" if errors.get(ref.uid) else "")


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> int:
    stop = stop or asyncio.Event()
    plugin_dir = Path(args.kubelet_plugins_directory_path) / args.driver_name
    plugin_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    cdi_root = Path(args.cdi_root)
    cdi_root.mkdir(parents=True, exist_ok=True)
    kube = await connect(args)
    try:
        sockets = await choose_sockets(args, kube, plugin_dir)     # before NVML: a refusal changes nothing
        backend = _open_backend(args, plugin_dir)
    except BaseException:
        await kube.close()
        raise
    inventory = discover(backend, args.node_name)
    log.info("node %s: %d GPU(s) (%s NVML, driver %s)", args.node_name, len(inventory.gpus), backend.kind,
             inventory.driver_version)
    publisher = SlicePublisher(kube, driver_name=args.driver_name, node_name=args.node_name, inventory=inventory,
                               features=SliceFeatures(taints=args.allocation_mode == C.ALLOCATION_MODE_CONTROLLER))
    # The NVIDIA container toolkit's CDI spec (device nodes, driver libraries) exists on real nodes only.
    toolkit_dirs = list(cdi.TOOLKIT_SPEC_DIRS) if args.nvml == "real" else []
    state = DeviceState(driver_name=args.driver_name, node_name=args.node_name, backend=backend,
                        inventory=inventory, cdi_root=cdi_root, plugin_dir=plugin_dir, cdi_search_dirs=toolkit_dirs)
    await state.recover()
    claims = KubeClaimSource(kube)
    observers, observer_tasks = start_observers(args, kube, backend, state, claims, stop)
    health = wire_health(health_config(args), backend, inventory, args.node_name, publisher, state,
                         observers.of_type(DeviceStatusWriter))
    svc = DraService(state, claims, observers)
    svc.on_change = health.stream.notify
    servers = PluginServers(svc, driver_name=args.driver_name, dra_socket=sockets.dra,
                            registration_socket=sockets.registration, health=health.stream)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(publisher.run(stop), name="publisher"),
             asyncio.create_task(follow_node_labels(state, kube, args.node_name, stop), name="node-labels"),
             asyncio.create_task(health.monitor.run(stop), name="health-monitor")]
    tasks += observer_tasks
    if getattr(args, "mps_check_interval", 0) > 0:
        tasks.append(asyncio.create_task(watch_mps_daemons(state, stop, args.mps_check_interval), name="mps-watch"))
    health = None
    try:
        await servers.start()
        if args.health_port >= 0:
            from driver.plugin.health import start_health_server

            health = await start_health_server(args.health_port, servers.dra_socket, servers.registration_socket)
        if args.metrics_port >= 0:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=args.metrics_address)
        tasks.append(asyncio.create_task(_cleanup_later(state, claims), name="stale-claims"))
        if ready is not None:
            ready.set()
        log.info("plugin for node %s ready", args.node_name)
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stop.set()
        await servers.stop()
        if health is not None:
            await health.stop(0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kube.close()
        backend.shutdown()
    return 0


async def choose_sockets(args: argparse.Namespace, kube: Kube, plugin_dir: Path) -> SocketPaths:
    """Fixed or per-instance socket names (driver/plugin/sockets.py), by --rolling-update and this Node's
    kubelet version."""
    mode = getattr(args, "rolling_update", "off")
    uid = getattr(args, "instance_uid", "") or ""
    registry = Path(args.kubelet_registrar_directory_path)
    fixed = socket_paths(args.driver_name, registry, plugin_dir)
    if mode == "off" or (mode == "auto" and not uid):
        return fixed
    version = await _kubelet_version(kube, args.node_name)
    supported = kubelet_supports_instances(version) if version else None
    need = ".".join(map(str, MIN_KUBELET))
    if supported is False:
        if mode == "on":
            raise StartupError(f"--rolling-update on (env ROLLING_UPDATE): Node {args.node_name} runs kubelet "
                               f"{version}, which keeps one plugin per driver and would drop this instance when "
                               f"the old one stops; per-instance sockets need kubelet {need}+. Upgrade the kubelet, "
                               f"or roll out without surge (chart: plugin.uniqueSockets=false, which sets "
                               f"ROLLING_UPDATE=off and maxSurge 0)")
        log.info("Node %s runs kubelet %s (older than %s): fixed socket names, one instance per node",
                 args.node_name, version, need)
        return fixed
    if supported is None and mode == "auto":
        log.warning("cannot read the kubelet version of Node %s; fixed socket names (set --rolling-update on to "
                    "use per-instance names regardless)", args.node_name)
        return fixed
    if supported is None:
        log.warning("cannot read the kubelet version of Node %s; per-instance socket names as --rolling-update on "
                    "asks (they need kubelet %s+)", args.node_name, need)
    paths = socket_paths(args.driver_name, registry, plugin_dir, uid)
    log.info("per-instance socket names (instance %s): %s, %s", uid, paths.registration, paths.dra)
    return paths


async def _kubelet_version(kube: Kube, node_name: str) -> str:
    try:
        node = await asyncio.wait_for(kube.get(node_path(node_name)), NODE_READ_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - API errors, an unreachable server, a timeout: decided by the caller
        log.warning("cannot read Node %s: %s", node_name, e)
        return ""
    return str(((node.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion") or "")


async def _cleanup_later(state: DeviceState, claims: KubeClaimSource) -> None:
    try:
        await cleanup_stale_claims(state, claims)
    except (KubeError, OSError) as e:
        log.warning("could not check prepared claims against the API server: %s", e)
    except Exception:  # noqa: BLE001
        log.exception("checking prepared claims against the API server failed")
