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

import heapq
import math
from statistics import fmean

from .engine import RunResult
from .workload import Request

#: a shape's wait is bounded when the age of its oldest waiting request grows by at most this many ticks per
#: tick of run from the first half of the steady state to the second (see :func:`boundedness`)
GROWTH_LIMIT = 0.05


def p95(values: list[int]) -> float:
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)])


def oldest_waiting(run: RunResult, requests: list[Request], lo: int) -> dict[str, list[int]]:
    """Per shape, for each tick from ``lo`` to the end of the run: how long the shape's oldest request still
    pending at the end of that tick has waited (0 when none of the shape waits). Unplaceable requests are
    not waiting. Computed from the arrivals and the start ticks: each request enters and leaves a heap once."""
    by_shape: dict[str, list[Request]] = {}
    for r in requests:
        if r.arrival < run.ticks and r.id not in run.unplaceable:
            by_shape.setdefault(str(r.shape), []).append(r)
    out: dict[str, list[int]] = {}
    for key, rs in by_shape.items():
        rs.sort(key=lambda r: (r.arrival, r.id))
        heap: list[tuple[int, int, float]] = []
        nxt = 0
        ages: list[int] = []
        for t in range(run.ticks):
            while nxt < len(rs) and rs[nxt].arrival <= t:
                r = rs[nxt]
                nxt += 1
                start = run.starts.get(r.id)
                heapq.heappush(heap, (r.arrival, r.id, math.inf if start is None else start))
            while heap and heap[0][2] <= t:      # placed by the end of tick t: no longer waiting
                heapq.heappop(heap)
            if t >= lo:
                ages.append(t - heap[0][0] if heap else 0)
        out[key] = ages
    return out


def boundedness(run: RunResult, requests: list[Request], lo: int, mean_runs: dict[str, float],
                limit: float = GROWTH_LIMIT) -> dict[str, dict]:
    """Per shape, whether its wait stays bounded over the steady state (docs/simulate.md, "Bounded wait"):
    the mean age of its oldest waiting request over the first and the second half of the steady state, and
    the growth between them per tick of run (0: the wait does not grow; 1: the shape is not served at all)."""
    ages = oldest_waiting(run, requests, lo)
    span = run.ticks - lo
    half = span // 2
    out: dict[str, dict] = {}
    for key, series in ages.items():
        first, second = series[:half], series[half:]
        a1 = fmean(first) if first else 0.0
        a2 = fmean(second) if second else 0.0
        growth = (a2 - a1) / (span / 2) if half else 0.0
        out[key] = {"oldest_first_half": a1, "oldest_second_half": a2, "oldest_at_end": series[-1] if series else 0,
                    "growth": growth, "bounded": growth <= limit}
    return out


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
    bound = boundedness(run, requests, lo, {k: r["mean_run"] for k, r in by_shape.items()})
    for key, row in by_shape.items():
        row["bound"] = bound.get(key)
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
