#!/usr/bin/env python3
"""Benchmark: NodePrepareResources + NodeUnprepareResources through the real plugin.

The plugin runs as its own process (``python -m driver plugin --nvml fake``) exactly as on a node; it reads
each claim from an API server (the in-process emulator, over HTTP) and writes CDI specs and its checkpoint
to disk. This script is the kubelet: one gRPC connection on the plugin's unix socket.

The API server (the sandbox's emulator) runs in its own process.

* ``1 claim``: one whole-GPU claim prepared and unprepared, one call at a time.
* ``N concurrent``: N pods start at once, each with its own claim (a share of one of the node's GPUs, so
  that N can exceed the GPU count), then all stop at once; the latency of every call is recorded.
* the plugin process's peak RSS (``VmHWM``) after both.
* CPU per share claim (prepare + unprepare, from /proc): the plugin (everything it does for the claim,
  the claim status writes after the answer included), the API server emulator and this client. All three
  share the machine's CPUs, so the latencies include the API server's and the client's work too.

The CDI specs go to a tmpfs (/dev/shm), as /var/run/cdi is on a node; the checkpoint stays on disk
(``--cdi-on-disk``: both on disk). ``--profile FILE`` runs this tree's plugin under cProfile, every thread.

``--baseline REV`` runs the same benchmark first against the plugin of git revision REV (``git archive``
into a temporary directory; the API server and this client stay the same) and prints each figure's ratio
(after / before), so that a change is judged on one machine under one load.

Usage: .venv/bin/python hack/bench_prepare.py [--iterations 300] [--concurrency 100] [--rounds 10]
       [--baseline REV] [--json]
Targets (issue 18): 100 concurrent share claims prepare p99 <= 50 ms and unprepare p99 <= 50 ms; one claim
p99 <= 2 ms; RSS <= 300 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from driver.api.kube import Kube, KubeError, claim_path, claims_path  # noqa: E402
from controller.sandbox.plugin import NodePaths, PluginProcess  # noqa: E402
from driver.api import naming  # noqa: E402
from driver.kubeletapi.dra.v1 import api_pb2 as dra  # noqa: E402
from driver.kubeletapi.dra.v1 import api_pb2_grpc as dra_grpc  # noqa: E402
from driver.nvml import open_backend  # noqa: E402
from driver.nvml.profile import parse_profile  # noqa: E402

NODE = "bench-node"
DRIVER = "gpu.partita.dev"
REPO = Path(__file__).resolve().parents[1]
PROFILE_HOOK = REPO / "hack" / "profile_hook"
#: where the CDI specs go: a tmpfs, as /var/run/cdi is on a node (creating a file on this machine's disk
#: costs about 0.3 ms, on a tmpfs microseconds); the checkpoint stays on disk, as /var/lib/kubelet is
TMPFS = Path("/dev/shm")
TARGETS = {"concurrent share claims: prepare": 50.0, "concurrent share claims: unprepare": 50.0,
           "1 whole-GPU claim: prepare": 2.0}
RSS_TARGET_MB = 300


def _claim(name: str, device: str, share: bool) -> dict:
    result = {"request": "gpu", "driver": DRIVER, "pool": NODE, "device": device}
    if share:
        result["shareID"] = str(uuid.uuid4())
        result["consumedCapacity"] = {"memory": "1Gi"}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": DRIVER}}]}},
            "status": {"allocation": {
                "devices": {"results": [result]},
                "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": [NODE]}]}]}}}}


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _summary(name: str, lat_ms: list[float]) -> dict:
    return {"case": name, "calls": len(lat_ms), "p50_ms": round(_pct(lat_ms, 50), 3),
            "p99_ms": round(_pct(lat_ms, 99), 3), "max_ms": round(max(lat_ms), 3),
            "mean_ms": round(statistics.fmean(lat_ms), 3)}


async def bench(args: argparse.Namespace, url: str, plugin: PluginProcess, gpus: list[str]) -> list[dict]:
    kube = await Kube.connect(url)
    try:
        await kube.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    except KubeError as e:
        if e.status != 409:      # the node exists: a second run against the same API server
            raise
    plugin.start()
    try:
        return await _bench(args, kube, plugin, gpus)
    finally:
        await kube.close()


async def _create(kube: Kube, claim: dict) -> dict:
    status = claim.pop("status")
    claim["metadata"]["name"] += f"-{uuid.uuid4().hex[:6]}"     # each run its own claims
    created = await kube.create(claims_path("default"), claim)
    created["status"] = status
    return await kube.replace(claim_path("default", created["metadata"]["name"], status=True), created)


async def _bench(args: argparse.Namespace, kube: Kube, plugin: PluginProcess, gpus: list[str]) -> list[dict]:
    await plugin.wait_ready()
    endpoint = plugin.paths.plugins / DRIVER / "dra.sock"
    async with grpc.aio.insecure_channel(f"unix://{endpoint}") as ch:
        stub = dra_grpc.DRAPluginStub(ch)

        async def call(method: str, claims: list[dict]) -> float:
            req_type = dra.NodePrepareResourcesRequest if method == "NodePrepareResources" \
                else dra.NodeUnprepareResourcesRequest
            req = req_type(claims=[dra.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"])
                                   for c in claims])
            t = time.perf_counter()
            resp = await getattr(stub, method)(req, timeout=60)
            dt = (time.perf_counter() - t) * 1000
            errors = [r.error for r in resp.claims.values() if r.error]
            if errors:
                raise SystemExit(f"{method} failed: {errors[0]}")
            return dt

        whole = await _create(kube, _claim("whole", gpus[0], share=False))
        for _ in range(args.warmup):
            await call("NodePrepareResources", [whole])
            await call("NodeUnprepareResources", [whole])
        prep, unprep, both = [], [], []
        for _ in range(args.iterations):
            a = await call("NodePrepareResources", [whole])
            b = await call("NodeUnprepareResources", [whole])
            prep.append(a)
            unprep.append(b)
            both.append(a + b)
        results = [_summary("1 whole-GPU claim: prepare", prep), _summary("1 whole-GPU claim: unprepare", unprep),
                   _summary("1 whole-GPU claim: prepare+unprepare", both)]

        n = args.concurrency
        shared = [await _create(kube, _claim(f"share-{i}", naming.shared_device_name(gpus[i % len(gpus)]), share=True))
                  for i in range(n)]
        cprep, cunprep = [], []
        pids = {"plugin": plugin.proc.pid, "apiserver": args.api_pid, "client": os.getpid()}
        cpu0 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
        for _ in range(args.rounds):
            cprep += await asyncio.gather(*(call("NodePrepareResources", [c]) for c in shared))
            cunprep += await asyncio.gather(*(call("NodeUnprepareResources", [c]) for c in shared))
        cpu1 = {k: _cpu_seconds(pid) for k, pid in pids.items()}
        results += [_summary(f"{n} concurrent share claims: prepare", cprep),
                    _summary(f"{n} concurrent share claims: unprepare", cunprep)]
        claims = n * args.rounds
        results.append({"case": "CPU per share claim (prepare+unprepare)", "cpu_ms_per_claim": {
            k: round((cpu1[k] - cpu0[k]) * 1000 / claims, 3) for k in pids
            if cpu0[k] is not None and cpu1[k] is not None}})
        results.append({"case": "plugin peak RSS", "rss_mb": _peak_rss_mb(plugin)})
        return results


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (all its threads)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(plugin: PluginProcess) -> float | None:
    try:
        for line in Path(f"/proc/{plugin.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, AttributeError):
        pass
    return None


@dataclass
class _Paths(NodePaths):
    """The sandbox node's paths, with the CDI directory on a tmpfs as on a node (/var/run/cdi)."""
    cdi_dir: Path = Path()

    @property
    def cdi(self) -> Path:
        return self.cdi_dir


def _checkout(rev: str, into: Path) -> Path:
    """The plugin's code at ``rev`` (its driver package, which the plugin process runs)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "driver"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _run(args: argparse.Namespace, profile, gpus: list[str], url: str, code: Path,
         profile_out: str | None = None) -> list[dict]:
    """One benchmark against a fresh plugin process running the ``driver`` package under ``code``;
    ``profile_out``: run that process under cProfile, every thread (hack/profile_hook), dumped there at exit."""
    with tempfile.TemporaryDirectory(prefix="partita-bench-") as tmp:
        path = [str(code)] + ([str(PROFILE_HOOK)] if profile_out else []) \
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = {"PYTHONPATH": os.pathsep.join(path)}
        if profile_out:
            env["PARTITA_PROFILE"] = str(Path(profile_out).resolve())
        plugin = PluginProcess(profile, profile.nodes[0], Path(tmp), url, DRIVER, log_level="WARNING", env=env)
        if not args.cdi_on_disk and TMPFS.is_dir():
            cdi_dir = Path(tempfile.mkdtemp(prefix="partita-bench-cdi-", dir=TMPFS))
            plugin.paths = _Paths(plugin.paths.root, cdi_dir)
        cwd = os.getcwd()
        os.chdir(code)           # ``python -m driver`` looks in the working directory first
        try:
            return asyncio.run(bench(args, url, plugin, gpus))
        finally:
            os.chdir(cwd)
            plugin.stop()
            if isinstance(plugin.paths, _Paths):
                shutil.rmtree(plugin.paths.cdi_dir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--model", default="H100-SXM5-80GB")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--baseline", metavar="REV", help="also run the plugin of this git revision first and print "
                   "the ratios (e.g. the merge base of a branch)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cdi-on-disk", action="store_true", help="write the CDI specs to the disk too (with the "
                   "checkpoint) instead of a tmpfs like /var/run/cdi")
    p.add_argument("--profile", metavar="FILE", help="run this tree's plugin process under cProfile (every "
                   "thread) and write its pstats to FILE when it stops (python -m pstats FILE)")
    args = p.parse_args()

    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                             "nodes": [{"name": NODE, "gpus": [{"model": args.model, "count": args.gpus}]}]})
    backend = open_backend("fake", profile=profile, node_name=NODE)
    backend.init()
    gpus = [naming.gpu_device_name(backend.device_info(backend.device_by_index(i)).uuid)
            for i in range(backend.device_count())]

    # The API server runs in a process of its own, as a real one would, so that it does not share this
    # process's interpreter lock with the benchmark's client.
    api = subprocess.Popen([sys.executable, "-m", "controller.sandbox.apiserver"], stdout=subprocess.PIPE, text=True)
    url = (api.stdout.readline() if api.stdout else "").strip()
    args.api_pid = api.pid
    base_dir = Path(tempfile.mkdtemp(prefix="partita-bench-base-")) if args.baseline else None
    try:
        before = _run(args, profile, gpus, url, _checkout(args.baseline, base_dir)) if base_dir else None
        results = _run(args, profile, gpus, url, REPO, args.profile)
    finally:
        api.terminate()
        api.wait(10)
        if base_dir:
            shutil.rmtree(base_dir, ignore_errors=True)
    env = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__,
           "load_average": [round(x, 2) for x in os.getloadavg()]}
    if before:
        for r, b in zip(results, before):
            r["before"] = {k: v for k, v in b.items() if k != "case"}
            for k in ("p50_ms", "p99_ms", "rss_mb"):
                if r.get(k) and b.get(k):
                    r[f"{k.split('_')[0]}_ratio"] = round(r[k] / b[k], 3)
    for r in results:
        target = next((t for name, t in TARGETS.items() if r["case"].endswith(name)), None)
        if target is not None:
            r["target_p99_ms"] = target
        elif "rss_mb" in r:
            r["target_mb"] = RSS_TARGET_MB
    if args.json:
        print(json.dumps({"environment": env, "baseline": args.baseline, "results": results}, indent=2))
        return 0
    print(f"# prepare benchmark: plugin process, fake {args.gpus}x{args.model}, claims read over HTTP; "
          f"{env['cpus']} CPUs, load average {env['load_average']}, Python {env['python']}, grpcio {env['grpcio']}"
          + (f"; ratio = this tree / {args.baseline}" if args.baseline else ""))
    width = max(len(r["case"]) for r in results)
    head = f"{'case'.ljust(width)}  {'calls':>6}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}  {'target':>7}"
    print(head + (f"  {'before p50':>10}  {'before p99':>10}  {'p99 ratio':>9}" if before else ""))
    for r in results:
        if "cpu_ms_per_claim" in r:
            was = (r.get("before") or {}).get("cpu_ms_per_claim") or {}
            print(f"{r['case']}: " + ", ".join(
                f"{k} {v:.2f} ms" + (f" (before {was[k]:.2f})" if k in was else "")
                for k, v in r["cpu_ms_per_claim"].items()))
            continue
        if "rss_mb" in r:
            line = f"{r['case'].ljust(width)}  {'':>6}  {r['rss_mb'] or 0:>8.1f}  {'MB':>8}  {'':>8}  {RSS_TARGET_MB:>7}"
            if before:
                line += f"  {'':>10}  {r['before'].get('rss_mb') or 0:>10.1f}  {r.get('rss_ratio', 0):>9.2f}"
            print(line)
            continue
        line = (f"{r['case'].ljust(width)}  {r['calls']:>6}  {r['p50_ms']:>8.2f}  {r['p99_ms']:>8.2f}  {r['max_ms']:>8.2f}"
                f"  {r.get('target_p99_ms', ''):>7}")
        if before:
            line += f"  {r['before']['p50_ms']:>10.2f}  {r['before']['p99_ms']:>10.2f}  {r.get('p99_ratio', 0):>9.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
