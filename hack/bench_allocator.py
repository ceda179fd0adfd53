#!/usr/bin/env python3
"""Benchmark: the allocator at cluster scale, its packing, and a long property run.

* **Scale**: synthetic clusters of N nodes x 8 H100-SXM5-80GB with the driver's full device model (whole
  GPU, every MIG placement with counters, shared device; built by driver/slices.py for one node and cloned
  per node), in controller mode (managed taint, tolerated as the controller does). For each mix (single:
  one whole GPU per claim; mig: 1g.10gb/2g.20gb/3g.40gb; shared: 10Gi/20Gi shares) and strategy, claims
  are allocated one at a time over all nodes with the allocated state updated after each, as the
  operator does: claims/s, p50/p99 per-claim latency, and peak RSS of the process (each configuration
  runs in its own process, so RSS is its own).
* **Packing**: mixed traces (whole, MIG and shared claims in random order, no releases; 5 seeds) on 10
  nodes, each allocated until the first unsatisfiable claim, for pack, first-fit and whole-GPU-only (every claim
  takes a whole GPU, as with the device plugin): claims placed and the share of GPU capacity they asked
  for (a MIG device counts its memory slices out of 8, a share its memory out of the GPU's).
* **Property run**: long random allocate/release streams through both strategies, every result checked
  by the independent validity checker of the test suite (tests/support/validity.py): violations must be 0.

Usage: .venv/bin/python hack/bench_allocator.py [--nodes 100 1000] [--claims 2000] [--quick] [--json]
Targets (issue 3) at 1,000 nodes, pack: >= 1,000 single-GPU claims/s, p99 <= 20 ms per claim, RSS <= 500 MB.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.allocator import AllocatedState, Allocator, Node, SliceIndex  # noqa: E402
from driver.api import constants as C  # noqa: E402
from driver.api.deviceclasses import device_classes  # noqa: E402
from driver.inventory import discover  # noqa: E402
from driver.nvml import open_backend, profile_from_spec  # noqa: E402
from driver.slices import build_slices  # noqa: E402

MODEL = "H100-SXM5-80GB"
CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
TOLERATE = [C.managed_toleration()]
MIG_SLICES = {"1g.10gb": 1, "2g.20gb": 2, "3g.40gb": 4, "4g.40gb": 4, "7g.80gb": 8}   # memory slices of 8


# -- cluster --------------------------------------------------------------------------------------
def template_slices(model: str = MODEL, gpus: int = 8) -> list[dict]:
    backend = open_backend("fake", profile=profile_from_spec(f"{model}:{gpus}", "template"), node_name="template")
    backend.init()
    return build_slices(discover(backend, "template"))


def cluster(n: int, model: str = MODEL) -> tuple[SliceIndex, list[Node]]:
    template = template_slices(model)
    index = SliceIndex()
    for i in range(n):
        name = f"node-{i:04d}"
        for s in template:
            c = copy.deepcopy(s)
            c["metadata"]["name"] = c["metadata"]["name"].replace("template", name)
            c["metadata"].pop("ownerReferences", None)
            c["spec"]["nodeName"] = name
            c["spec"]["pool"]["name"] = name
            index.upsert(c)
    return index, [Node(f"node-{i:04d}", {"kubernetes.io/hostname": f"node-{i:04d}"}) for i in range(n)]


# -- claims ---------------------------------------------------------------------------------------
def claim(i: int, cls: str, selector: str | None = None, memory: str | None = None) -> dict:
    exactly: dict = {"deviceClassName": cls, "tolerations": TOLERATE}
    if selector:
        exactly["selectors"] = [{"cel": {"expression": selector}}]
    if memory:
        exactly["capacity"] = {"requests": {"memory": memory}}
    return {"metadata": {"name": f"c{i}", "namespace": "bench", "uid": f"u{i}"},
            "spec": {"devices": {"requests": [{"name": "r", "exactly": exactly}]}}}


def mig_claim(i: int, profile: str) -> dict:
    return claim(i, C.DEVICE_CLASS_MIG, f"device.attributes['gpu.partita.dev'].migProfile == '{profile}'")


def mix(kind: str, n: int, rng: random.Random) -> list[dict]:
    if kind == "single":
        return [claim(i, C.DEVICE_CLASS_GPU) for i in range(n)]
    if kind == "mig":
        return [mig_claim(i, rng.choice(("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"))) for i in range(n)]
    if kind == "shared":
        return [claim(i, C.DEVICE_CLASS_SHARED, memory=rng.choice(("10Gi", "10Gi", "20Gi"))) for i in range(n)]
    raise ValueError(kind)


# -- scale ----------------------------------------------------------------------------------------
def scale(nodes: int, kind: str, strategy: str, claims: int) -> dict:
    t0 = time.perf_counter()
    index, node_list = cluster(nodes)
    build_s = time.perf_counter() - t0
    allocator = Allocator(strategy=strategy)
    state = AllocatedState()
    latencies = []
    placed = 0
    work = mix(kind, claims, random.Random(1))
    start = time.perf_counter()
    for c in work:
        t = time.perf_counter()
        choice = allocator.allocate_on_nodes(node_list, [c], index, CLASSES, state)
        if choice.node is not None:
            state.add_allocation(choice.results[0])
            placed += 1
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    latencies.sort()
    return {"nodes": nodes, "gpus": nodes * 8, "mix": kind, "strategy": strategy, "claims": claims, "placed": placed,
            "claims_per_s": claims / total, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": 1000 * latencies[-1], "build_s": build_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# -- packing efficiency ---------------------------------------------------------------------------
def trace(n: int, rng: random.Random) -> list[tuple[str, str | None, float]]:
    """(kind, argument, share of a GPU it asks for)."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.2:
            out.append(("whole", None, 1.0))
        elif r < 0.6:
            p = rng.choice(("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb"))
            out.append(("mig", p, MIG_SLICES[p] / 8))
        else:
            gi = rng.choice((10, 10, 20, 40))
            out.append(("shared", f"{gi}Gi", gi * 1024 / 81559))
    return out


def packing(nodes: int = 10, seeds: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[dict]:
    """Per strategy, the mean over traces of several seeds (and each trace's figure)."""
    index, node_list = cluster(nodes)
    runs = [_packing(index, node_list, nodes, trace(nodes * 8 * 8, random.Random(seed))) for seed in seeds]
    out = []
    for i, first in enumerate(runs[0]):
        per = [r[i] for r in runs]
        out.append({"strategy": first["strategy"],
                    "claims_placed": statistics.mean(r["claims_placed"] for r in per),
                    "capacity_allocated": statistics.mean(r["capacity_allocated"] for r in per),
                    "per_trace": [round(r["capacity_allocated"], 4) for r in per]})
    return out


def _packing(index: SliceIndex, node_list: list[Node], nodes: int, items: list) -> list[dict]:
    out = []
    for label, strategy, whole_only in (("pack", "pack", False), ("first-fit", "first-fit", False),
                                        ("whole-GPU-only", "first-fit", True)):
        allocator = Allocator(strategy=strategy)
        state = AllocatedState()
        placed, asked = 0, 0.0
        for i, (kind, arg, size) in enumerate(items):
            if whole_only or kind == "whole":
                c = claim(i, C.DEVICE_CLASS_GPU)
            elif kind == "mig":
                c = mig_claim(i, arg)
            else:
                c = claim(i, C.DEVICE_CLASS_SHARED, memory=arg)
            choice = allocator.allocate_on_nodes(node_list, [c], index, CLASSES, state)
            if choice.node is None:
                break
            state.add_allocation(choice.results[0])
            placed += 1
            asked += size
        out.append({"strategy": label, "claims_placed": placed, "capacity_allocated": asked / (nodes * 8)})
    return out


# -- long property run ----------------------------------------------------------------------------
def property_run(streams: int, length: int) -> list[dict]:
    from tests.support.allocstream import KINDS, MIG_PROFILES, WHOLE, StreamResult, cluster_slices, run_stream

    slices, nodes = cluster_slices()
    out = []
    for strategy in ("first-fit", "pack"):
        rng = random.Random(7)
        total = StreamResult()
        start = time.perf_counter()
        for _ in range(streams):
            ops: list[tuple] = []
            for _ in range(length):
                if rng.random() < 0.25:
                    ops.append(("release", rng.randrange(1000)))
                    continue
                kind = rng.choice(KINDS)
                arg = {"whole": lambda: rng.choice(sorted(WHOLE)), "mig": lambda: rng.choice(MIG_PROFILES),
                       "shared": lambda: rng.randint(1, 40), "pair": lambda: None}[kind]()
                ops.append(("alloc", kind, arg))
            res = run_stream(ops, strategy, slices, nodes)
            total.allocated += res.allocated
            total.unsatisfiable += res.unsatisfiable
            total.problems += res.problems
        out.append({"strategy": strategy, "operations": streams * length, "allocated": total.allocated,
                    "unsatisfiable": total.unsatisfiable, "violations": len(total.problems),
                    "first_violations": total.problems[:3], "seconds": time.perf_counter() - start})
    return out


# -- driver ---------------------------------------------------------------------------------------
def _child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"configuration {args} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--claims", type=int, default=2000, help="claims per scale configuration")
    p.add_argument("--mixes", nargs="+", default=["single", "mig", "shared"])
    p.add_argument("--strategies", nargs="+", default=["pack", "first-fit"])
    p.add_argument("--streams", type=int, default=40, help="property run: streams per strategy")
    p.add_argument("--stream-length", type=int, default=150)
    p.add_argument("--quick", action="store_true", help="100 nodes, 500 claims, a short property run")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", nargs=4, metavar=("NODES", "MIX", "STRATEGY", "CLAIMS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(scale(int(a.child[0]), a.child[1], a.child[2], int(a.child[3]))))
        return 0
    if a.quick:
        a.nodes, a.claims, a.streams = [100], 500, 5
    results = {"scale": [], "packing": [], "property": []}
    print(f"# allocator benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"{MODEL} x 8 per node, full device model", flush=True)
    print(f"{'nodes':>5} {'mix':<7} {'strategy':<9} {'claims':>6} {'placed':>6} {'claims/s':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'RSS MB':>7}", flush=True)
    for n in a.nodes:
        for kind in a.mixes:
            for strategy in a.strategies:
                r = _child([str(n), kind, strategy, str(a.claims)])
                results["scale"].append(r)
                print(f"{n:>5} {kind:<7} {strategy:<9} {r['claims']:>6} {r['placed']:>6} {r['claims_per_s']:>9.0f} "
                      f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['max_ms']:>7.1f} {r['peak_rss_mb']:>7.0f}", flush=True)
    print("\n# packing: mixed traces (5 seeds) on 10 nodes (80 GPUs), each until its first unsatisfiable claim")
    for r in packing():
        results["packing"].append(r)
        print(f"{r['strategy']:<15} claims placed {r['claims_placed']:>6.1f}   GPU capacity asked for by them "
              f"{100 * r['capacity_allocated']:5.1f}%   per trace "
              f"{', '.join(f'{100 * x:.1f}' for x in r['per_trace'])}", flush=True)
    print(f"\n# property run: {a.streams} streams x {a.stream_length} operations per strategy, every result checked")
    for r in property_run(a.streams, a.stream_length):
        results["property"].append(r)
        print(f"{r['strategy']:<10} operations {r['operations']:>6}  allocated {r['allocated']:>6}  "
              f"unsatisfiable {r['unsatisfiable']:>5}  violations {r['violations']}  ({r['seconds']:.1f}s)", flush=True)
    if a.json:
        print(json.dumps(results, indent=2))
    bad = sum(r["violations"] for r in results["property"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
