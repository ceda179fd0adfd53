"""The figures of a run (docs/simulate.md defines each).

* **useful capacity**: per tick, the GPU capacity the running requests asked for, over the cluster's GPUs —
  a whole GPU counts 1, a MIG device its memory slices over its GPU's (1g.10gb = 1/8), a share its
  memory over its GPU's memory (20Gi on an 80GB H100 = 0.25). What a request *holds* beyond that (the
  whole GPU a device plugin gives a 1g.10gb job) is not useful; it is in **held capacity**.
* **GPU fragmentation**: per tick, of the free capacity (1 - held, per GPU), the share that lies on GPUs
  partly in use — free, but not usable by a whole-GPU request.
* **node fragmentation**: per tick, of the entirely free GPUs, the share on nodes that are partly in use —
  free, but not usable by a job that needs a whole node.
* **wait**: ticks from arrival to placement, per request shape, over the requests that arrived in steady
  state and were placed: mean, p95 (nearest rank) and mean wait over the shape's mean lifetime (None
  when none of them was placed). Requests still waiting at the end are not in it (they are counted as
  never placed), so under overload the figure is a lower bound.
* **never placed**: requests still pending at the end; **unplaceable**: requests whose shape does not fit
  even the empty cluster (set aside on arrival, not counted as waiting).

Time-series figures are means over the steady state: the ticks from ``warmup`` to the end.
"""

from __future__ import annotations

import math
from statistics import fmean

from .engine import RunResult
from .workload import Request


def p95(values: list[int]) -> float:
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])


def summarize(run: RunResult, requests: list[Request], warmup: int) -> dict:
    lo = min(warmup, max(0, run.ticks - 1))
    window = slice(lo, run.ticks)

    def mean(series: list[float]) -> float:
        part = series[window]
        return fmean(part) if part else 0.0

    by_shape: dict[str, dict] = {}
    runs: dict[str, list[int]] = {}
    waits: dict[str, list[int]] = {}
    keys = {}
    arrived = [r for r in requests if r.arrival < run.ticks]     # a trace cut short by --ticks: the rest never came
    for r in arrived:
        key = str(r.shape)
        keys[key] = r.shape.sort_key()
        runs.setdefault(key, []).append(r.duration)
        row = by_shape.setdefault(key, {"arrived": 0, "placed": 0, "never_placed": 0, "unplaceable": 0})
        row["arrived"] += 1
        if r.id in run.unplaceable:
            row["unplaceable"] += 1
            continue
        start = run.starts.get(r.id)
        if start is None:
            row["never_placed"] += 1
            continue
        row["placed"] += 1
        if r.arrival >= lo:
            waits.setdefault(key, []).append(start - r.arrival)
    for key, row in by_shape.items():
        w = waits.get(key, [])
        mean_run = fmean(runs[key])
        row["steady_state_placed"] = len(w)
        row["mean_wait"] = fmean(w) if w else None      # None: no steady-state arrival of the shape was placed
        row["p95_wait"] = p95(w) if w else None
        row["mean_run"] = mean_run
        row["wait_per_run"] = fmean(w) / mean_run if w else None
    ordered = dict(sorted(by_shape.items(), key=lambda kv: keys[kv[0]]))
    return {
        "strategy": run.strategy,
        "ticks": run.ticks,
        "steady_state_from": lo,
        "useful_capacity": mean(run.useful),
        "held_capacity": mean(run.held),
        "gpu_fragmentation": mean(run.gpu_frag),
        "node_fragmentation": mean(run.node_frag),
        "mean_pending": mean([float(p) for p in run.pending]),
        "arrived": len(arrived),
        "placed": len(run.starts),
        "never_placed": sum(r["never_placed"] for r in by_shape.values()),
        "unplaceable": len(run.unplaceable),
        "by_shape": ordered,
        "allocator_calls": run.attempts,
        "seconds": run.seconds,
    }
