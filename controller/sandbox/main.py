"""``partita sandbox``: the whole system on one machine, no cluster (docs/architecture.md §7).

An in-process API server; per fake-GPU node the real kubelet plugin in its own process (real unix
sockets, CDI specs, checkpoint) and a kubelet stand-in that registers it and prepares claims over gRPC;
stand-ins for the resourceclaim controller and kube-scheduler's binding; the real controller. It applies
workload manifests (default: ``examples/``; Deployments, StatefulSets and Jobs are expanded into pods by
stand-ins, and a Job's pods finish after ``--job-run-time``), waits until every pod runs, finished, or is
pending for a reason, and every Job is complete or stuck, prints per pod its node, devices and CDI devices,
the Jobs' progress and the cluster's GPU utilization, then deletes the pods and checks that every claim was
unprepared and released. Exit 0 when all of that held.

SIGTERM and SIGINT (Ctrl-C) stop it at any point, with or without ``--keep-running``: the workload is
deleted if it was applied, every plugin and MPS stand-in is stopped and the temporary work directory is
removed (exit 128 + the signal's number). A failed run leaves no process and no temporary directory behind
either; the plugin logs' last lines are printed instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from controller.allocator import STRATEGIES
from controller.operator.claims import is_pending
from controller.operator.controller import ControllerConfig
from controller.operator.main import Running, quiet_kopf
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.cliopts import add_log_level, add_output, seconds
from driver.errors import PartitaError
from driver.logfmt import add_log_format
from driver.nvml.profile import FakeGpuProfile, ProfileError, load_profile, parse_profile, profile_from_spec
from driver.plugin.telemetry import ratio

from . import manifests as mf
from .apiserver import ApiServer
from .healthstream import HealthStream
from .jobs import JobController
from .kubelet import Kubelet
from .plugin import PluginProcess
from .progress import Progress
from .reaper import reap
from .report import jobs_table, render
from .standins import Binder, ClaimController
from .threads import ControllerThread
from .usagefeed import UsageFeed, proc_root

log = logging.getLogger("partita.sandbox")
_SECONDS = seconds(0, 3600)        # the type of the sandbox's SECONDS flags
DEFAULT_PROFILE = Path(__file__).with_name("default-cluster.yaml")


class SandboxError(PartitaError, RuntimeError):
    """The sandbox could not do its job; the message says what and where to look."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, help="FakeGpuProfile file listing the nodes and their GPUs "
                   "(default: 4 nodes, 2 x 8xH100 + 4xA100-80GB + 2xL4)")
    p.add_argument("--node", action="append", default=[], metavar="NAME=MODEL:COUNT[,MODEL:COUNT]",
                   help="a node with built-in GPU models, e.g. node-a=H100-SXM5-80GB:8 (repeat; replaces the default)")
    p.add_argument("--manifests", "-f", type=Path, nargs="+", metavar="FILE",
                   help="workload manifests to apply (default: every examples/*.yaml)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="pack", help="the controller's device choice")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the pods to settle")
    p.add_argument("--workdir", type=Path, help="keep sockets, CDI specs, checkpoints and plugin logs here "
                   "(default: a temporary directory, removed at the end)")
    p.add_argument("--keep-running", action="store_true", help="after the report, keep the cluster up until Ctrl-C "
                   "(the API server URL is printed; point kubectl-style clients at it)")
    p.add_argument("--job-run-time", type=_SECONDS, default=2.0, metavar="SECONDS",
                   help="how long each Job pod runs before it succeeds (default %(default)s)")
    p.add_argument("--progress", action="store_true",
                   help="say on stderr what the sandbox waits for, every few seconds (default: only on a terminal)")
    add_output(p, help_="table (default), wide (also each pod's claims and workload), or the report as yaml or "
                        "json (stdout holds the report only)")
    add_log_level(p, "WARNING", "log level of the sandbox and controller (plugin logs always go to "
                                "<workdir>/<node>/plugin.log)")
    add_log_format(p)
    p.add_argument("--usage-interval", type=_SECONDS, default=2.0, metavar="SECONDS",
                   help="the plugins sample GPU usage this often (default %(default)s); pods annotated "
                        "sandbox.partita.dev/gpu-utilization: \"<percent>\" (and sandbox.partita.dev/gpu-memory: "
                        "\"2Gi\") run a fake process with that load on their devices")
    p.add_argument("--idle-period", type=_SECONDS, default=1800.0, metavar="SECONDS",
                   help="a claim below --idle-threshold for this long is reported idle (default %(default)s)")
    p.add_argument("--idle-threshold", type=ratio, default=0.05, metavar="RATIO",
                   help="utilization ratio below which a claim counts as idle (default %(default)s)")


def cluster_profile(args: argparse.Namespace) -> FakeGpuProfile:
    if args.profile and args.node:
        raise ProfileError("use either --profile or --node, not both")
    if args.node:
        nodes = []
        for item in args.node:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise ProfileError(f"--node {item!r}: write NAME=MODEL:COUNT[,MODEL:COUNT], e.g. node-a=H100-SXM5-80GB:8")
            nodes.append(profile_from_spec(spec, name).nodes[0].model_dump(by_alias=True, mode="json"))
        return parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": nodes},
                             "--node")
    profile = load_profile(args.profile or DEFAULT_PROFILE, "--profile", "--node NAME=MODEL:COUNT")
    wild = [n.name for n in profile.nodes if n.name == "*"]
    if wild:
        raise ProfileError(f"{args.profile}: the sandbox needs real node names; replace the \"*\" entry by named nodes")
    return profile


def _node_object(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {}, "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110"},
                                   "conditions": [{"type": "Ready", "status": "True"}]}}


@dataclass
class Outcome:
    report: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Sandbox:
    def __init__(self, profile: FakeGpuProfile, workdir: Path, *, strategy: str = "pack",
                 driver: str = C.DEFAULT_DRIVER_NAME, plugin_log_level: str = "INFO", job_run_time: float = 2.0,
                 plugin_env: dict[str, str] | None = None):
        self.profile = profile
        self.plugin_env = plugin_env or {}      # extra environment of every plugin (usage sampling settings)
        self.usage_feed: UsageFeed | None = None   # pods' injected GPU load (controller/sandbox/usagefeed.py)
        self.workdir = workdir
        self.driver = driver
        self.server = ApiServer(bookmark_interval=2.0)
        self.plugins: list[PluginProcess] = []
        self.kubelets: list[Kubelet] = []
        self.claim_controller = ClaimController(self.server)
        self.binder = Binder(self.server)
        self.job_controller = JobController(self.server, job_run_time)
        self.running: list[Running] = []
        self.controller_thread: ControllerThread | None = None
        self.cfg = ControllerConfig(driver_name=driver, strategy=strategy, retry_min=0.25, retry_max=5.0,
                                    report_after=1.0)
        self.plugin_log_level = plugin_log_level
        self._loop_task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        url = await self.server.start()
        for c in device_classes(self.driver):
            self.server.create(c)
        for n in self.profile.nodes:
            self.server.create(_node_object(n.name))
        self.plugins = [PluginProcess(self.profile, n, self.workdir, url, self.driver, self.plugin_log_level,
                                      env={"PROC_ROOT": str(proc_root(self.workdir, n.name)), **self.plugin_env})
                        for n in self.profile.nodes]
        self.usage_feed = UsageFeed(self.server, self.profile, self.workdir, self.driver,
                                    {p.name: p.paths.plugin_dir(self.driver) / "fake-nvml" for p in self.plugins})
        for p in self.plugins:
            p.start()
        await asyncio.gather(*(p.wait_ready() for p in self.plugins))
        for p in self.plugins:
            k = Kubelet(self.server, p.name, p.paths.registry, self.driver)
            await k.register()
            self.kubelets.append(k)
        await self.server.wait_for(lambda s: all(self._published(p.name) for p in self.plugins), 60)
        self.controller_thread = ControllerThread(self.cfg, url, self.running)
        await asyncio.get_running_loop().run_in_executor(None, self.controller_thread.start)
        self._loop_task = asyncio.create_task(self._standins())
        self.health_streams = [HealthStream(k) for k in self.kubelets]       # KEP-4680, as the kubelet does
        self._health_tasks = [asyncio.create_task(h.run(self._stopping)) for h in self.health_streams]

    def _published(self, node: str) -> bool:
        return any((s.get("spec") or {}).get("nodeName") == node and (s.get("spec") or {}).get("driver") == self.driver
                   for s in self.server.list("resourceslices"))

    async def _standins(self) -> None:
        rv = -1
        while not self._stopping.is_set():
            self.job_controller.sync()
            self.claim_controller.sync()
            self.binder.sync()
            for k in self.kubelets:
                k.sync()
            if self.usage_feed is not None:
                try:
                    self.usage_feed.sync()
                except Exception:  # noqa: BLE001 - injected load is a sandbox extra; never stops the stand-ins
                    log.exception("injecting GPU load failed")
            rv = await self.server.changed(rv if rv >= 0 else self.server.resource_version, 0.25)

    async def stop(self) -> list[str]:
        problems = []
        self._stopping.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for t in getattr(self, "_health_tasks", []):
            t.cancel()
        await asyncio.gather(*getattr(self, "_health_tasks", []), return_exceptions=True)
        for k in self.kubelets:
            await k.drain()
        if self.controller_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.controller_thread.stop)
        for p in self.plugins:
            code = await asyncio.get_running_loop().run_in_executor(None, p.stop)
            if code not in (0, None):
                problems.append(f"the plugin of node {p.name} exited with code {code} on SIGTERM; see {p.paths.log}")
        left = await asyncio.get_running_loop().run_in_executor(None, reap, self.workdir)
        if left:
            log.warning("stopped %d process(es) left under %s (MPS stand-ins of plugins that did not stop them)",
                        len(left), self.workdir)
        await self.server.stop()
        return problems

    # -- workload -------------------------------------------------------------------------------
    @property
    def controller(self):  # noqa: ANN201
        return self.running[-1].controller if self.running else None

    def pods(self) -> list[dict]:
        return self.server.list("pods")

    def pending_reasons(self) -> dict[str, str]:
        out: dict[str, str] = dict(self.claim_controller.problems)
        if self.controller is not None:
            out.update(self.controller.why_pending)
        for k in self.kubelets:
            out.update({pod: f"prepare failed on node {k.node}: {msg}" for pod, msg in k.failures.items()})
        return out

    def settled(self) -> bool:
        reasons = self.pending_reasons()
        for pod in self.pods():
            md = pod["metadata"]
            k = f"{md['namespace']}/{md['name']}"
            phase = (pod.get("status") or {}).get("phase", "Pending")
            if phase in ("Running", "Succeeded", "Failed"):
                continue
            if is_pending(pod) and k in reasons:
                continue
            if k in reasons and (pod.get("spec") or {}).get("nodeName"):
                continue      # bound, but its prepare failed
            return False
        return not self.job_controller.busy(grace=self.cfg.retry_max + 1.0)

    def waiting_for(self) -> str:
        """What :meth:`wait_settled` waits for, in a few words."""
        reasons = self.pending_reasons()
        phases: dict[str, int] = {}
        unexplained = 0
        for pod in self.pods():
            md = pod["metadata"]
            phase = (pod.get("status") or {}).get("phase", "Pending")
            phases[phase] = phases.get(phase, 0) + 1
            if phase == "Pending" and f"{md['namespace']}/{md['name']}" not in reasons:
                unexplained += 1
        parts = [f"{n} {phase.lower()}" for phase, n in sorted(phases.items())]
        line = f"pods to settle: {', '.join(parts) or 'no pods yet'}"
        if unexplained:
            line += f" ({unexplained} pending without a reason yet)"
        busy = [f"Job {j['name']} {j['completions']}" for j in self.job_controller.progress() if not j["complete"]]
        return line + (f"; {', '.join(busy)} complete" if busy else "")

    async def wait_settled(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet_since = None
        rv = self.server.resource_version
        while loop.time() < deadline:
            rv_now = await self.server.changed(rv, 0.2)
            if rv_now != rv:
                rv, quiet_since = rv_now, None
                continue
            if self.settled():
                quiet_since = quiet_since or loop.time()
                if loop.time() - quiet_since >= 1.0:
                    return True
            for p in self.plugins:
                if not p.alive():
                    raise SandboxError(f"the plugin of node {p.name} died:\n{p.log_tail()}")
        return False

    def report(self, wide: bool = False) -> tuple[str, dict]:
        cdi = {pod: prep.claims for k in self.kubelets for pod, prep in k.prepared.items()}
        pods = self.pods()
        claims = self.server.list("resourceclaims", group="resource.k8s.io")
        slices = self.server.list("resourceslices")
        reasons = self.pending_reasons()
        jobs = self.job_controller.progress()
        text = render(pods, claims, slices, self.driver, cdi, reasons, wide=wide)
        if jobs:
            text += "\n\nJobs:\n" + jobs_table(jobs)
        data = {"pods": [{"name": f"{p['metadata']['namespace']}/{p['metadata']['name']}",
                          "phase": (p.get("status") or {}).get("phase"), "node": (p.get("spec") or {}).get("nodeName"),
                          "claims": cdi.get(f"{p['metadata']['namespace']}/{p['metadata']['name']}", {}),
                          "pending": reasons.get(f"{p['metadata']['namespace']}/{p['metadata']['name']}"),
                          "createdBy": ((p["metadata"].get("annotations") or {}).get(mf.CREATED_BY))}
                         for p in pods],
                "jobs": jobs,
                "apiRequests": self.server.requests}
        return text, data

    async def delete_workload(self, timeout: float = 60.0) -> list[str]:
        """Delete every pod (and the Jobs), as a user would; the kubelets unprepare, claims are released and
        deleted."""
        self.job_controller.stop()
        for p in self.pods():
            self.server.delete("pods", p["metadata"]["name"], p["metadata"]["namespace"])
        for c in self.server.list("resourceclaims", group="resource.k8s.io"):
            self.server.delete("resourceclaims", c["metadata"]["name"], c["metadata"]["namespace"], group="resource.k8s.io")
        problems = []
        try:
            await self.server.wait_for(lambda s: not s.list("pods") and
                                       not s.list("resourceclaims", group="resource.k8s.io"), timeout)
        except TimeoutError:
            left = [f"{c['metadata']['namespace']}/{c['metadata']['name']}"
                    for c in self.server.list("resourceclaims", group="resource.k8s.io")]
            pods = [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in self.server.list("pods")]
            problems.append(f"after deleting the workload, pods {pods} and claims {left} are still there after {timeout:.0f}s")
        for p in self.plugins:
            specs = sorted(x.name for x in p.paths.cdi.glob("*")) if p.paths.cdi.exists() else []
            if specs:
                problems.append(f"node {p.name}: CDI specs left after every claim was unprepared: {specs}")
        return problems


async def run_sandbox(args: argparse.Namespace, out=sys.stdout) -> int:  # noqa: ANN001
    profile = cluster_profile(args)
    files = list(args.manifests or mf.default_files())
    notes: list[str] = []
    workload = mf.load(files, notes)
    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="partita-sandbox-")) if temp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    usage_env = {"USAGE_INTERVAL": str(getattr(args, "usage_interval", 2.0)),
                 "IDLE_PERIOD": str(getattr(args, "idle_period", 1800.0)),
                 "IDLE_THRESHOLD": str(getattr(args, "idle_threshold", 0.05))}
    sandbox = Sandbox(profile, workdir, strategy=args.strategy, job_run_time=getattr(args, "job_run_time", 2.0),
                      plugin_env=usage_env)
    output = getattr(args, "output", "table")
    gpus = sum(g.count for n in profile.nodes for g in n.gpus)
    say = (lambda *a: print(*a, file=out, flush=True)) if output in ("table", "wide") else (lambda *a: None)
    progress = Progress.for_stderr(getattr(args, "progress", False))
    problems: list[str] = []
    rejected = False
    received: list[int] = []
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    applied = False

    def on_signal(signum: int) -> None:
        if received:
            print(f"sandbox: {signal.Signals(signum).name} again; still stopping the plugins and removing "
                  f"{workdir}", file=sys.stderr, flush=True)
            return
        received.append(signum)
        print(f"sandbox: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
        if main_task is not None:
            main_task.cancel()

    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass        # not the main thread (tests): signals stay as they were
    try:
        try:
            say(f"Starting {len(profile.nodes)} fake-GPU nodes ({gpus} GPUs), the API server and the controller...")
            async with progress.waiting(f"the plugins of {len(profile.nodes)} node(s) to register and publish, "
                                        "and the controller to start"):
                await sandbox.start()
            say(f"API server {sandbox.server.url}; plugins registered on {', '.join(p.name for p in sandbox.plugins)}; "
                f"work directory {workdir}")
            say(f"Applying {len(workload)} objects from {', '.join(str(f) for f in files)}")
            for n in notes:
                print(f"sandbox note: {n}", file=sys.stderr, flush=True)
            mf.apply(sandbox.server, workload)
            applied = True
            for job in mf.jobs(workload):
                sandbox.job_controller.add(job)
            async with progress.waiting(sandbox.waiting_for):
                if not await sandbox.wait_settled(args.timeout):
                    problems.append(f"the pods did not settle within {args.timeout:.0f}s (neither running, finished "
                                    "nor pending with a reason): " + sandbox.waiting_for())
            text, data = sandbox.report(wide=output == "wide")
            if output == "json":
                print(json.dumps(data, indent=2), file=out, flush=True)
            elif output == "yaml":
                print(yaml.safe_dump(data, sort_keys=False), file=out, end="", flush=True)
            else:
                say("")
                say(text)
                say("")
            if args.keep_running:
                say(f"The cluster keeps running at {sandbox.server.url}; press Ctrl-C (or send SIGTERM) to stop.")
                say("Its GPUs, usage and idle claims: partita status --kube-api " + sandbox.server.url +
                    "".join(f" --metrics-url {p.metrics_url}" for p in sandbox.plugins if p.metrics_url))
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not received:
                raise
            asyncio.current_task().uncancel()
        if applied:
            async with progress.waiting("the workload's claims to be unprepared and released"):
                problems += await sandbox.delete_workload()
            if not problems and not received:
                say("Deleted the workload: every claim was unprepared (no CDI specs left) and released.")
    except asyncio.CancelledError:
        if not received:
            raise
        asyncio.current_task().uncancel()      # the signal's: stop as below, then exit 128 + its number
    except mf.ManifestError as e:       # bad input, as when it is found before the start: exit 2
        problems.append(str(e))
        rejected = True
    except (SandboxError, RuntimeError, TimeoutError, OSError) as e:
        problems.append(str(e) or type(e).__name__)
    finally:
        try:
            async with progress.waiting("the plugins and the controller to stop"):
                problems += await asyncio.shield(sandbox.stop())
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            if problems and temp:
                for p in sandbox.plugins:
                    tail = p.log_tail(10)
                    if tail and tail != "(no log)" and any(w in tail for w in ("ERROR", "Traceback", "CRITICAL")):
                        print(f"sandbox: the last lines of node {p.name}'s plugin log:\n{tail}", file=sys.stderr)
            if temp:
                shutil.rmtree(workdir, ignore_errors=True)
    for p in problems:
        print(f"sandbox problem: {p}", file=sys.stderr)
    if problems and temp and not rejected:
        print("sandbox: the temporary work directory is removed; pass --workdir DIR to keep the plugin logs, "
              "sockets and CDI specs", file=sys.stderr)
    say(f"Done in {time.monotonic() - started:.1f}s.")
    if received:
        return 128 + received[0]
    return 2 if rejected else 1 if problems else 0


def run(args: argparse.Namespace) -> int:
    level = str(args.log_level).upper()
    logging.getLogger().setLevel(level)
    quiet_kopf(level)
    if getattr(args, "log_format", "text") != "text":
        os.environ["LOG_FORMAT"] = args.log_format      # the plugin processes inherit it
    try:
        return asyncio.run(run_sandbox(args))
    except (ProfileError, mf.ManifestError) as e:
        print(f"partita sandbox: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
