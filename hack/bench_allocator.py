#!/usr/bin/env python3
"""Benchmark: the allocator at cluster scale, its packing, and a long property run.

* **Scale**: synthetic clusters of N nodes x 8 H100-SXM5-80GB with the driver's full device model (whole
  GPU, every MIG placement with counters, shared device; built by driver/slices.py for one node and cloned
  per node with renamed slices, pool and nodeName), in controller mode (managed taint, tolerated as the
  controller does). For each mix (single: one whole GPU per claim, at most one claim per GPU; mig:
  1g.10gb/2g.20gb/3g.40gb; shared: 10Gi/20Gi shares; fill: single-GPU claims until every GPU is taken,
  with claims/s per quarter of the fill) and strategy, claims are allocated one at a time over
  all nodes with the allocated state updated after each, as the operator does: claims/s, p50/p99
  per-claim latency, and peak RSS. One process per cluster size builds the slice index once, then forks
  one child per configuration, so each configuration starts from the same cold caches and its peak RSS
  (index included) is its own.
* **Packing**: mixed traces (whole, MIG and shared claims in random order, no releases; 5 seeds) on 10
  nodes, each allocated until the first unsatisfiable claim, for pack, first-fit and whole-GPU-only (every claim
  takes a whole GPU, as with the device plugin): claims placed and the share of GPU capacity they asked
  for (a MIG device counts its memory slices out of 8, a share its memory out of the GPU's).
* **Upstream peer** (when ../shared/oracle/draalloc exists; --peer-nodes, --peer-claims, --no-peer,
  --only-peer): upstream's allocator (``draalloc trace``) and Partita's on the same cluster (20 nodes by
  default) and the same claims of each mix, like for like per node: per claim, both try the nodes in
  cluster order until the first fit and update the allocated state. Upstream's time per claim covers
  NewAllocator with the current state (kube-scheduler's PreFilter), Allocate on each node tried (Filter,
  sequential) and the state update (assume); Partita's covers Allocator.allocate on each node tried and
  AllocatedState.add_allocation (no strategy ordering, no cache of nodes that did not fit). Printed: how
  many decisions (node and devices) were the same, nodes tried on each side, time per node tried on each
  side and their ratio (Partita / upstream), claims/s on each side; then the same claims once more with one
  node per claim (the node upstream chose), so that one operation is exactly one Allocate (plus upstream's
  NewAllocator and both sides' state update) on one node's slices: time per operation and the ratio.
* **Property run**: long random allocate/release streams (2,000 operations each) through both strategies
  on the test suite's cluster (tests/support/allocstream.py), every state checked by its independent
  validity checker (tests/support/validity.py; its slice parsing is memoized here, nothing else changes):
  violations must be 0.

Usage: .venv/bin/python hack/bench_allocator.py [--nodes 100 1000] [--claims 2000] [--quick] [--json FILE]
A full run takes about 3 minutes on 2 cores; --quick (100 nodes, 500 claims, short property run) 20 seconds.
Targets (issue 3) at 1,000 nodes, pack: >= 1,000 single-GPU claims/s, p99 <= 20 ms per claim, RSS <= 500 MB;
(issue 18) filling 1,000 nodes with pack: >= 3,000 claims/s overall, the last quarter >= 80 % of the first.
The fill figures and the upstream ratio in one run: --nodes 1000 --mixes fill single --strategies pack.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controller.allocator import AllocatedState, AllocationError, Allocator, Node, SliceIndex  # noqa: E402
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
    """``n`` nodes, each a clone of one node's slices from the real builder, renamed."""
    index = SliceIndex()
    for c in _raw_slices(n, model):
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
    if kind in ("single", "fill"):
        return [claim(i, C.DEVICE_CLASS_GPU) for i in range(n)]
    if kind == "mig":
        return [mig_claim(i, rng.choice(("1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"))) for i in range(n)]
    if kind == "shared":
        return [claim(i, C.DEVICE_CLASS_SHARED, memory=rng.choice(("10Gi", "10Gi", "20Gi"))) for i in range(n)]
    raise ValueError(kind)


# -- scale ----------------------------------------------------------------------------------------
def scale(index: SliceIndex, node_list: list[Node], kind: str, strategy: str, claims: int) -> dict:
    allocator = Allocator(strategy=strategy)
    state = AllocatedState()
    latencies = []
    placed = 0
    if kind == "single":
        claims = min(claims, 8 * len(node_list))      # one whole GPU each: no more claims than GPUs
    elif kind == "fill":
        claims = 8 * len(node_list)                   # single-GPU claims until every GPU is taken
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
    quarter = max(1, len(latencies) // 4)
    quarters = [round(len(q) / sum(q)) for q in (latencies[i:i + quarter] for i in range(0, quarter * 4, quarter))]
    latencies.sort()
    return {"nodes": len(node_list), "gpus": len(node_list) * 8, "mix": kind, "strategy": strategy,
            "claims": claims, "placed": placed, "claims_per_s": claims / total,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": 1000 * latencies[-1], "peak_rss_mb": _rss_mb(), "claims_per_s_by_quarter": quarters}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale_size(nodes: int, configs: list[tuple[str, str]], claims: int) -> list[dict]:
    """Build the index once, then fork one child per configuration (copy-on-write: the child starts with
    the built index and cold allocator caches; ru_maxrss of a child counts the pages it inherited)."""
    t0 = time.perf_counter()
    index, node_list = cluster(nodes)
    build_s = time.perf_counter() - t0
    base_rss = _rss_mb()
    # The index lives as long as the process: keep it out of the cyclic collector's full collections (as a
    # long-running controller would after its initial list). Without this, one full collection traversing
    # the 1,000-node index (about 0.5 s) lands in whichever quarter of the fill it happens to fall in.
    gc.collect()
    gc.freeze()
    out = []
    for kind, strategy in configs:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:           # child
            os.close(r)
            try:
                got = scale(index, node_list, kind, strategy, claims)
                os.write(w, json.dumps(got).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if not data or status:
            raise SystemExit(f"configuration {nodes} nodes {kind} {strategy} failed (status {status})")
        got = json.loads(data)
        got.update(build_s=build_s, build_peak_rss_mb=base_rss)
        out.append(got)
    return out


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


# -- upstream peer -----------------------------------------------------------------------------------
ORACLE = REPO.parent / "shared" / "oracle" / "draalloc"
#: the features Partita's allocator runs with (Features() defaults), by upstream name
PEER_FEATURES = ["DRAAdminAccess", "DRAPrioritizedList", "DRAPartitionableDevices", "DRADeviceTaints",
                 "DRAConsumableCapacity"]


def _api_claim(c: dict) -> dict:
    """The claim as the API server stores it (allocationMode and count defaulted, as draalloc requires)."""
    c = json.loads(json.dumps(c))
    c.update(apiVersion="resource.k8s.io/v1", kind="ResourceClaim")
    for r in c["spec"]["devices"]["requests"]:
        r["exactly"].setdefault("allocationMode", "ExactCount")
        r["exactly"].setdefault("count", 1)
    return c


def peer(nodes: int, claims: int, kinds: list[str]) -> list[dict]:
    """Partita's allocator and upstream's (``draalloc trace``) on the same cluster and claims, like for
    like: for each claim, the nodes are tried one at a time in cluster order and the first that fits
    wins, then the allocated state is updated with the result. Upstream's time per claim is
    NewAllocator with the current state (kube-scheduler's PreFilter) + Allocate on each node tried
    (Filter, sequential) + the state update (assume); Partita's is Allocator.allocate on each node tried
    + AllocatedState.add_allocation (no node ordering by a strategy, no cache of nodes that did not
    fit: allocate_on_nodes would skip those). Both sides try the same nodes when they decide the same,
    so the time per node tried compares one Allocate with one allocate on one node's slices."""
    index, node_list = cluster(nodes)
    slices = list(_raw_slices(nodes))
    out = []
    for kind in kinds:
        n = min(claims, 8 * nodes) if kind == "single" else claims
        work = [_api_claim(c) for c in mix(kind, n, random.Random(1))]
        ops = [{"op": "init", "features": PEER_FEATURES, "nodes": [{"name": x.name, "labels": dict(x.labels)}
                                                                    for x in node_list],
                "deviceClasses": list(CLASSES.values()), "resourceSlices": slices}]
        ops += [{"op": "allocate", "claim": c} for c in work]
        lines = _trace(ops)
        warnings = [w for x in lines for w in x.get("warnings") or []]
        up = [x for x in lines if x["op"] == "allocate"]
        allocator = Allocator(strategy="first-fit")
        state = AllocatedState()
        ours_lat, ours_tried, same = [], 0, 0
        for c, u in zip(work, up):
            t = time.perf_counter()
            got_node, got = None, None
            for node in node_list:
                ours_tried += 1
                try:
                    res = allocator.allocate(node, [c], index, CLASSES, state)
                except AllocationError as e:
                    if e.node_local:
                        continue
                    break
                if res is not None:
                    got_node, got = node.name, res[0]
                    state.add_allocation(got)
                    break
            ours_lat.append(time.perf_counter() - t)
            devs = [f"{x['driver']}/{x['pool']}/{x['device']}" for x in got["devices"]["results"]] if got else []
            same += (u.get("node") == got_node and (u.get("devices") or []) == devs)
        up_lat = [x["latencyUS"] / 1e6 for x in up]
        up_tried = sum(x.get("nodesTried", 0) for x in up)
        row = {"nodes": nodes, "mix": kind, "claims": n, "same_decisions": same,
               "upstream_allocator": next((x["summary"].get("allocator") for x in lines if x["op"] == "summary"), ""),
               "upstream_nodes_tried": up_tried, "ours_nodes_tried": ours_tried,
               "upstream_us_per_node": 1e6 * sum(up_lat) / max(1, up_tried),
               "ours_us_per_node": 1e6 * sum(ours_lat) / max(1, ours_tried),
               "upstream_p50_ms": 1000 * sorted(up_lat)[len(up_lat) // 2],
               "ours_p50_ms": 1000 * sorted(ours_lat)[len(ours_lat) // 2],
               "upstream_claims_per_s": len(up_lat) / sum(up_lat), "ours_claims_per_s": len(ours_lat) / sum(ours_lat),
               "warnings": warnings[:3]}
        row["ratio_per_node"] = row["ours_us_per_node"] / row["upstream_us_per_node"]
        # One node per claim: the node upstream chose above (node-0000, full by then, for a claim it did
        # not place), so each operation is exactly one Allocate on one node's slices on both sides.
        chosen = [u.get("node") or node_list[0].name for u in up]
        one = _trace(ops[:1] + [{"op": "allocate", "claim": c, "nodeName": nn} for c, nn in zip(work, chosen)])
        by_name = {x.name: x for x in node_list}
        allocator, state, ours_one = Allocator(strategy="first-fit"), AllocatedState(), []
        for c, nn in zip(work, chosen):
            t = time.perf_counter()
            try:
                res = allocator.allocate(by_name[nn], [c], index, CLASSES, state)
            except AllocationError:
                res = None
            if res is not None:
                state.add_allocation(res[0])
            ours_one.append(time.perf_counter() - t)
        up_one = [x["latencyUS"] for x in one if x["op"] == "allocate"]
        row["upstream_us_one_node"] = sum(up_one) / len(up_one)
        row["ours_us_one_node"] = 1e6 * sum(ours_one) / len(ours_one)
        row["ratio_one_node"] = row["ours_us_one_node"] / row["upstream_us_one_node"]
        out.append(row)
    return out


def _trace(ops: list[dict]) -> list[dict]:
    r = subprocess.run([str(ORACLE), "trace"], input="\n".join(json.dumps(o) for o in ops) + "\n",
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"draalloc trace failed: {r.stderr[-2000:]}")
    return [json.loads(x) for x in r.stdout.splitlines() if x.strip()]


def _raw_slices(n: int, model: str = MODEL) -> Iterator[dict]:
    """The cluster's slices as API objects, node by node (what :func:`cluster` indexes; draalloc reads the same)."""
    template = json.dumps(template_slices(model))
    for i in range(n):
        name = f"node-{i:04d}"
        for c in json.loads(template):
            c["metadata"]["name"] = c["metadata"]["name"].replace("template", name)
            c["metadata"]["labels"] = {k: (name if v == "template" else v)
                                       for k, v in (c["metadata"].get("labels") or {}).items()}
            c["metadata"].pop("ownerReferences", None)
            c["spec"]["nodeName"] = name
            c["spec"]["pool"]["name"] = name
            yield c


# -- long property run ----------------------------------------------------------------------------
def property_run(streams: int, length: int, release: float = 0.35) -> list[dict]:
    from tests.support import validity
    from tests.support.allocstream import KINDS, MIG_PROFILES, WHOLE, StreamResult, cluster_slices, run_stream

    parsed: dict = {}
    read_slices = validity.read_slices

    def memo(slices: list[dict], driver: str):  # noqa: ANN202 - the checker never mutates what it reads
        key = (id(slices), driver)
        if key not in parsed:
            parsed[key] = (slices, read_slices(slices, driver))
        return parsed[key][1]

    validity.read_slices = memo
    slices, nodes = cluster_slices()
    out = []
    try:
        for strategy in ("first-fit", "pack"):
            rng = random.Random(7)
            total = StreamResult()
            start = time.perf_counter()
            for _ in range(streams):
                ops: list[tuple] = []
                for _ in range(length):
                    if rng.random() < release:
                        ops.append(("release", rng.randrange(1000)))
                        continue
                    kind = rng.choice(KINDS)
                    arg = {"whole": lambda: rng.choice(sorted(WHOLE)), "mig": lambda: rng.choice(MIG_PROFILES),
                           "shared": lambda: rng.randint(1, 40), "pair": lambda: None}[kind]()
                    ops.append(("alloc", kind, arg))
                res = run_stream(ops, strategy, slices, nodes)
                total.allocated += res.allocated
                total.unsatisfiable += res.unsatisfiable
                total.released += res.released
                total.problems += res.problems
            out.append({"strategy": strategy, "streams": streams, "stream_length": length,
                        "operations": streams * length, "allocated": total.allocated, "released": total.released,
                        "unsatisfiable": total.unsatisfiable, "violations": len(total.problems),
                        "first_violations": total.problems[:3], "seconds": time.perf_counter() - start})
    finally:
        validity.read_slices = read_slices
    return out


# -- driver ---------------------------------------------------------------------------------------
def _child(nodes: int, configs: list[tuple[str, str]], claims: int) -> list[dict]:
    arg = json.dumps({"nodes": nodes, "configs": configs, "claims": claims})
    r = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"scale run for {nodes} nodes failed:\n{r.stderr}")
    return json.loads(r.stdout)


TARGETS = {"claims_per_s": 1000.0, "p99_ms": 20.0, "peak_rss_mb": 500.0}
#: issue 18: filling every GPU of 1,000 nodes with pack: overall rate, and the last quarter against the first
FILL_TARGETS = {"claims_per_s": 3000.0, "last_to_first": 0.8}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--claims", type=int, default=2000, help="claims per scale configuration (default 2000)")
    p.add_argument("--mixes", nargs="+", default=["single", "mig", "shared", "fill"],
                   choices=["single", "mig", "shared", "fill"],
                   help="claim mixes (fill: single-GPU claims until every GPU of the cluster is taken)")
    p.add_argument("--strategies", nargs="+", default=["pack", "first-fit"], choices=["pack", "first-fit"])
    p.add_argument("--streams", type=int, default=20, help="property run: streams per strategy (default 20)")
    p.add_argument("--stream-length", type=int, default=2000, help="property run: operations per stream")
    p.add_argument("--quick", action="store_true", help="100 nodes, 500 claims, 2 streams of 500 operations")
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    p.add_argument("--peer-nodes", type=int, default=20,
                   help="upstream peer (when ../shared/oracle/draalloc exists): cluster size (default 20)")
    p.add_argument("--peer-claims", type=int, default=160, help="upstream peer: claims per mix (default 160)")
    p.add_argument("--no-peer", action="store_true", help="skip the upstream peer")
    p.add_argument("--only-peer", action="store_true", help="run only the upstream peer")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(scale_size(spec["nodes"], [tuple(c) for c in spec["configs"]], spec["claims"])))
        return 0
    if a.quick:
        a.nodes, a.claims, a.streams, a.stream_length = [100], 500, 2, 500
    started = time.perf_counter()
    results: dict = {"scale": [], "packing": [], "property": [], "peer": []}
    if a.only_peer:
        a.nodes, a.no_peer = [], False
    print(f"# allocator benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; "
          f"{MODEL} x 8 per node, full device model ({len(template_slices())} slices, "
          f"{sum(len(s['spec'].get('devices') or []) for s in template_slices())} devices per node)", flush=True)
    print(f"{'nodes':>5} {'mix':<7} {'strategy':<9} {'claims':>6} {'placed':>6} {'claims/s':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'RSS MB':>7}", flush=True)
    configs = [(kind, strategy) for kind in a.mixes for strategy in a.strategies]
    for n in a.nodes:
        rows = _child(n, configs, a.claims)
        results["scale"] += rows
        for r in rows:
            print(f"{n:>5} {r['mix']:<7} {r['strategy']:<9} {r['claims']:>6} {r['placed']:>6} "
                  f"{r['claims_per_s']:>9.0f} "
                  f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['max_ms']:>7.1f} {r['peak_rss_mb']:>7.0f}", flush=True)
            if r["mix"] == "fill":
                print(f"{'':>5}   claims/s by quarter of the fill: "
                      f"{', '.join(str(q) for q in r['claims_per_s_by_quarter'])}", flush=True)
        print(f"{n:>5} nodes: slice index built in {rows[0]['build_s']:.1f}s (peak RSS while building "
              f"{rows[0]['build_peak_rss_mb']:.0f} MB; a configuration's RSS starts from the built index)", flush=True)
    target = next((r for r in results["scale"] if r["nodes"] == 1000 and r["mix"] == "single"
                   and r["strategy"] == "pack"), None)
    if target is not None:
        ok = (target["claims_per_s"] >= TARGETS["claims_per_s"] and target["p99_ms"] <= TARGETS["p99_ms"]
              and target["peak_rss_mb"] <= TARGETS["peak_rss_mb"])
        print(f"targets at 1,000 nodes, pack, single GPU (>= 1,000 claims/s, p99 <= 20 ms, RSS <= 500 MB): "
              f"{target['claims_per_s']:.0f} claims/s, p99 {target['p99_ms']:.2f} ms, "
              f"RSS {target['peak_rss_mb']:.0f} MB"
              f" -> {'met' if ok else 'MISSED'}", flush=True)
        results["targets_met"] = ok
    fill = next((r for r in results["scale"] if r["nodes"] == 1000 and r["mix"] == "fill"
                 and r["strategy"] == "pack"), None)
    if fill is not None:
        q = fill["claims_per_s_by_quarter"]
        flat = q[-1] / q[0] if q[0] else 0.0
        ok = fill["claims_per_s"] >= FILL_TARGETS["claims_per_s"] and flat >= FILL_TARGETS["last_to_first"]
        print(f"fill targets at 1,000 nodes, pack (>= 3,000 claims/s overall, last quarter >= 80 % of the first): "
              f"{fill['claims_per_s']:.0f} claims/s, last quarter {100 * flat:.0f} % of the first "
              f"({q[-1]} vs {q[0]} claims/s) -> {'met' if ok else 'MISSED'}", flush=True)
        results["fill_targets_met"] = ok
    if not a.no_peer and ORACLE.is_file():
        print(f"\n# upstream peer: draalloc trace ({ORACLE}) and Partita on the same {a.peer_nodes} nodes and claims; per "
              "claim both try the nodes in cluster order, first fit wins, state updated (see peer()). upstream "
              "times NewAllocator + Allocate per node tried + state update; Partita allocate per node tried + "
              "state update. Ratio = Partita / upstream time per node tried.", flush=True)
        print(f"{'mix':<7} {'claims':>6} {'same':>5} {'nodes tried':>11} {'upstream us/node':>16} {'Partita us/node':>15} "
              f"{'ratio':>6} {'upstream cl/s':>13} {'Partita cl/s':>12} | one node per claim: "
              f"{'upstream us':>11} {'Partita us':>10} {'ratio':>6}", flush=True)
        for r in peer(a.peer_nodes, a.peer_claims, [m for m in a.mixes if m != "fill"] or ["single"]):
            results["peer"].append(r)
            print(f"{r['mix']:<7} {r['claims']:>6} {r['same_decisions']:>5} "
                  f"{r['upstream_nodes_tried']:>5}/{r['ours_nodes_tried']:<5} {r['upstream_us_per_node']:>16.0f} "
                  f"{r['ours_us_per_node']:>15.0f} {r['ratio_per_node']:>6.3f} {r['upstream_claims_per_s']:>13.0f} "
                  f"{r['ours_claims_per_s']:>12.0f} | {'':>19} {r['upstream_us_one_node']:>11.0f} "
                  f"{r['ours_us_one_node']:>10.0f} {r['ratio_one_node']:>6.3f}"
                  + (f"  draalloc warnings: {r['warnings']}" if r["warnings"] else ""),
                  flush=True)
        if results["peer"]:
            print(f"upstream implementation (as kube-scheduler picks for Partita's features): "
                  f"{', '.join(sorted({r['upstream_allocator'] for r in results['peer']}))}; 'same' counts claims "
                  "placed on the same node with the same devices by both", flush=True)
    elif not a.no_peer:
        print(f"\n# upstream peer skipped: {ORACLE} not found", flush=True)
    if a.only_peer:
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2))
        return 0
    print("\n# packing: mixed traces (5 seeds) on 10 nodes (80 GPUs), each until its first unsatisfiable claim")
    for r in packing():
        results["packing"].append(r)
        print(f"{r['strategy']:<15} claims placed {r['claims_placed']:>6.1f}   GPU capacity asked for by them "
              f"{100 * r['capacity_allocated']:5.1f}%   per trace "
              f"{', '.join(f'{100 * x:.1f}' for x in r['per_trace'])}", flush=True)
    print(f"\n# property run: {a.streams} streams x {a.stream_length} operations per strategy, every state checked")
    for r in property_run(a.streams, a.stream_length):
        results["property"].append(r)
        print(f"{r['strategy']:<10} operations {r['operations']:>6}  allocated {r['allocated']:>6}  released "
              f"{r['released']:>6}  unsatisfiable {r['unsatisfiable']:>5}  violations {r['violations']}  "
              f"({r['seconds']:.1f}s)", flush=True)
        for v in r["first_violations"]:
            print(f"    {v}", flush=True)
    results["seconds"] = time.perf_counter() - started
    print(f"\n# total {results['seconds']:.0f}s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    bad = sum(r["violations"] for r in results["property"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
