"""Rendering a simulation: a table per strategy and per request shape, or JSON."""

from __future__ import annotations

import json


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def render_table(report: dict) -> str:
    w = report["workload"]
    c = report["cluster"]
    lines = [f"cluster: {c['nodes']} nodes, {c['gpus']} GPUs ({c['summary']})",
             f"workload: {w['description']}; {w['requests']} requests (offered load {100 * w['offered_load']:.0f}%)"
             f"{'' if w.get('seed') is None else ', seed ' + str(w['seed'])}; "
             f"{report['ticks_label']}; steady state from tick {report['steady_state_from']}", ""]
    head = (f"{'strategy':<15} {'useful':>7} {'held':>7} {'GPU frag':>8} {'node frag':>9} {'pending':>8} "
            f"{'placed':>7} {'never':>6} {'unplaceable':>11} {'seconds':>7}")
    lines.append(head)
    for s in report["strategies"]:
        lines.append(f"{s['strategy']:<15} {_pct(s['useful_capacity']):>7} {_pct(s['held_capacity']):>7} "
                     f"{_pct(s['gpu_fragmentation']):>8} {_pct(s['node_fragmentation']):>9} "
                     f"{s['mean_pending']:>8.1f} {s['placed']:>7} {s['never_placed']:>6} {s['unplaceable']:>11} "
                     f"{s['seconds']:>7.1f}")
    lines += ["", "wait by request shape (ticks; steady-state arrivals that were placed; x run = mean wait / "
              "mean lifetime)"]
    shapes: list[str] = []
    for s in report["strategies"]:
        for k in s["by_shape"]:
            if k not in shapes:
                shapes.append(k)
    names = [s["strategy"] for s in report["strategies"]]
    lines.append(f"{'shape':<18} {'run':>6} " + " ".join(f"{n + ' mean/p95/x run':>32}" for n in names))
    for k in shapes:
        cells = []
        run = None
        for s in report["strategies"]:
            row = s["by_shape"].get(k)
            if row is None:
                cells.append(f"{'-':>32}")
                continue
            run = row["mean_run"]
            never = f" never {row['never_placed']}" if row["never_placed"] else ""
            if row["mean_wait"] is None:
                cells.append(f"none placed{never}".rjust(32))
            else:
                cells.append(f"{row['mean_wait']:.1f}/{row['p95_wait']:.0f}/{row['wait_per_run']:.2f}x{never}".rjust(32))
        lines.append(f"{k:<18} {run or 0:>6.1f} " + " ".join(cells))
    return "\n".join(lines)
