#!/usr/bin/env python3
"""Benchmark: NodePrepareResources + NodeUnprepareResources through the real plugin.

The plugin runs as its own process (``python -m driver plugin --nvml fake``) exactly as on a node; it reads
each claim from an API server (the in-process emulator, over HTTP) and writes CDI specs and its checkpoint
to disk. This script is the kubelet: one gRPC connection on the plugin's unix socket.

The API server (the sandbox's emulator) runs in its own process.

* ``1 claim``: one whole-GPU claim prepared and unprepared, one call at a time.
* ``N concurrent``: N pods start at once, each with its own claim (a share of one of the node's GPUs, so
  that N can exceed the GPU count), then all stop at once; the latency of every call is recorded.

Usage: .venv/bin/python hack/bench_prepare.py [--iterations 300] [--concurrency 100] [--rounds 10] [--json]
Target (issue 2): p99 <= 5 ms for one whole-GPU claim on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from driver.api.kube import Kube, claim_path, claims_path  # noqa: E402
from controller.sandbox.plugin import PluginProcess  # noqa: E402
from driver.api import naming  # noqa: E402
from driver.kubeletapi.dra.v1 import api_pb2 as dra  # noqa: E402
from driver.kubeletapi.dra.v1 import api_pb2_grpc as dra_grpc  # noqa: E402
from driver.nvml import open_backend  # noqa: E402
from driver.nvml.profile import parse_profile  # noqa: E402

NODE = "bench-node"
DRIVER = "gpu.partita.dev"


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
    await kube.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    plugin.start()
    try:
        return await _bench(args, kube, plugin, gpus)
    finally:
        await kube.close()


async def _create(kube: Kube, claim: dict) -> dict:
    status = claim.pop("status")
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
        for _ in range(args.rounds):
            cprep += await asyncio.gather(*(call("NodePrepareResources", [c]) for c in shared))
            cunprep += await asyncio.gather(*(call("NodeUnprepareResources", [c]) for c in shared))
        results += [_summary(f"{n} concurrent share claims: prepare", cprep),
                    _summary(f"{n} concurrent share claims: unprepare", cunprep)]
        return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--model", default="H100-SXM5-80GB")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--json", action="store_true")
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
    with tempfile.TemporaryDirectory(prefix="partita-bench-") as tmp:
        plugin = PluginProcess(profile, profile.nodes[0], Path(tmp), url, DRIVER, log_level="WARNING")
        try:
            results = asyncio.run(bench(args, url, plugin, gpus))
        finally:
            plugin.stop()
            api.terminate()
            api.wait(10)
    env = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "grpcio": grpc.__version__}
    if args.json:
        print(json.dumps({"environment": env, "results": results}, indent=2))
    else:
        print(f"# prepare benchmark: plugin process, fake {args.gpus}x{args.model}, claims read over HTTP; "
              f"{env['cpus']} CPUs, Python {env['python']}, grpcio {env['grpcio']}")
        width = max(len(r["case"]) for r in results)
        print(f"{'case'.ljust(width)}  {'calls':>6}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}")
        for r in results:
            print(f"{r['case'].ljust(width)}  {r['calls']:>6}  {r['p50_ms']:>8.2f}  {r['p99_ms']:>8.2f}  {r['max_ms']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
