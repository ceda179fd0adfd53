"""``partita simulate``: how strategies allocate under churn (docs/simulate.md).

    partita simulate --mix mixed                          # 16 x 8 H100, 125 % load, 2,000 ticks
    partita simulate --node a=H100-SXM5-80GB:8 --node b=L4:2 --trace pods.csv -o json --plot out.png

Exit 0 after the report, 2 on bad input (the message names the file, line and field, or the option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cluster import Cluster, build_cluster, cluster_profile
from .engine import simulate
from .errors import SimulateError
from .metrics import summarize
from .report import render_json, render_table
from .strategies import SIM_STRATEGIES, get_strategies
from .trace import load_trace
from .workload import MIXES, Request, check_shapes, generate, offered_load

DEFAULT_TICKS = 2000
DEFAULT_LOAD = 1.25
DEFAULT_MEAN_DURATION = 50.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("cluster (default: 16 nodes x 8 H100-SXM5-80GB)")
    c.add_argument("--node", action="append", default=[], metavar="NAME=MODEL:COUNT[,MODEL:COUNT]",
                   help="a node with built-in GPU models, e.g. node-a=H100-SXM5-80GB:8 (repeat)")
    c.add_argument("--profile", type=Path, metavar="FILE", help="a FakeGpuProfile file listing the nodes")
    c.add_argument("--nodes", type=int, help="this many identical nodes (with --gpus; default 16)")
    c.add_argument("--gpus", metavar="MODEL:COUNT[,MODEL:COUNT]", help="the GPUs of each of --nodes (default "
                   "H100-SXM5-80GB:8)")
    w = p.add_argument_group("workload")
    w.add_argument("--mix", choices=MIXES, help="built-in mix of request shapes (default mixed)")
    w.add_argument("--trace", type=Path, metavar="FILE", help="past pods instead of a mix: CSV or JSON with "
                   "arrival, duration, request[, model]")
    w.add_argument("--load", type=float, help=f"offered load of a mix, share of capacity (default {DEFAULT_LOAD})")
    w.add_argument("--mean-duration", type=float, help=f"mean lifetime of a mix's requests in ticks (default "
                   f"{DEFAULT_MEAN_DURATION:g})")
    w.add_argument("--seed", type=int, default=1, help="seed of a mix's arrivals (default 1)")
    r = p.add_argument_group("run")
    r.add_argument("--ticks", type=int, help=f"ticks to simulate (default {DEFAULT_TICKS}; a trace: until every "
                   "request ended)")
    r.add_argument("--warmup", type=int, help="ticks left out of the steady-state figures (default a quarter "
                   "of --ticks for a mix, 0 for a trace)")
    r.add_argument("--strategies", nargs="+", default=list(SIM_STRATEGIES), metavar="STRATEGY",
                   help=f"compare these ({', '.join(SIM_STRATEGIES)}; default all)")
    r.add_argument("-o", "--output", choices=("table", "json"), default="table")
    r.add_argument("--series", action="store_true", help="with -o json, also the per-tick useful capacity")
    r.add_argument("--plot", type=Path, metavar="FILE.png", help="draw utilization over time and wait by shape "
                   "(needs matplotlib: pip install 'partita[plot]')")


def _workload(args: argparse.Namespace, cluster: Cluster) -> tuple[list[Request], dict, int | None]:
    if args.trace and args.mix:
        raise SimulateError("use either --mix or --trace, not both")
    if args.trace:
        for opt, val in (("--load", args.load), ("--mean-duration", args.mean_duration)):
            if val is not None:
                raise SimulateError(f"{opt} applies to a built-in mix; a trace carries its own arrivals and durations")
        requests = load_trace(args.trace)
        check_shapes(requests, cluster)
        return requests, {"trace": str(args.trace), "seed": None,
                          "description": f"trace {args.trace.name}"}, args.ticks
    mix = args.mix or "mixed"
    ticks = DEFAULT_TICKS if args.ticks is None else args.ticks
    load = DEFAULT_LOAD if args.load is None else args.load
    mean = DEFAULT_MEAN_DURATION if args.mean_duration is None else args.mean_duration
    requests = generate(mix, cluster, ticks=ticks, load=load, mean_duration=mean, seed=args.seed)
    return requests, {"mix": mix, "load": load, "mean_duration": mean, "seed": args.seed,
                      "description": f"mix {mix} at {100 * load:g}% load, mean lifetime {mean:g} ticks"}, ticks


def simulate_report(args: argparse.Namespace) -> tuple[dict, dict[str, list[float]]]:
    if args.ticks is not None and args.ticks < 1:
        raise SimulateError(f"--ticks {args.ticks}: simulate at least 1 tick")
    if args.warmup is not None and args.warmup < 0:
        raise SimulateError(f"--warmup {args.warmup}: must be 0 or more ticks")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise SimulateError(f"--plot {args.plot}: write a .png file")
    strategies = get_strategies(args.strategies)
    cluster = build_cluster(cluster_profile(args.node, args.profile, args.nodes, args.gpus))
    requests, workload, ticks = _workload(args, cluster)
    if args.warmup is not None:
        warmup = args.warmup
    else:
        warmup = ticks // 4 if args.trace is None and ticks else 0
    summaries = []
    series = {}
    for s in strategies:
        run = simulate(s, cluster, requests, ticks)
        summaries.append(summarize(run, requests, warmup))
        series[s.name] = run.useful
    workload["requests"] = len(requests)
    ran = max(x["ticks"] for x in summaries)
    span = ticks if ticks is not None else max(r.arrival for r in requests) + 1
    workload["offered_load"] = offered_load(requests, cluster, span)
    least = min(x["ticks"] for x in summaries)
    span = f"{ran} ticks" if least == ran else f"{least}-{ran} ticks by strategy"
    report = {
        "cluster": {"nodes": len(cluster.nodes), "gpus": len(cluster.gpus), "spec": cluster.spec,
                    "summary": _summary(cluster)},
        "workload": workload,
        "ticks": ran,
        "ticks_label": f"{ran} ticks" if ticks is not None else f"until every request ended ({span})",
        "steady_state_from": min(warmup, max(0, ran - 1)),
        "strategies": summaries,
    }
    if args.series:
        report["series"] = {"useful_capacity": series}
    return report, series


def _summary(cluster: Cluster) -> str:
    counts: dict[str, int] = {}
    for g in cluster.gpus:
        counts[g.model] = counts.get(g.model, 0) + 1
    return ", ".join(f"{n} x {m}" for m, n in counts.items())


def run(args: argparse.Namespace) -> int:
    logging.getLogger("controller.allocator").setLevel(logging.ERROR)
    try:
        report, series = simulate_report(args)
        if args.plot is not None:
            from .plot import write_plot

            write_plot(report, series, args.plot)
    except SimulateError as e:
        print(f"partita simulate: {e}", file=sys.stderr)
        return 2
    print(render_json(report) if args.output == "json" else render_table(report))
    if args.plot is not None and args.output == "table":
        print(f"\nplot written to {args.plot}")
    return 0
