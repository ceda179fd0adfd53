"""``--plot FILE.png``: useful capacity over time per strategy, and wait by request shape.

matplotlib is optional (the ``plot`` extra); it is imported only here, only when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SimulateError

INSTALL_HINT = "pip install 'partita[plot]'"


def write_plot(report: dict, series: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SimulateError(f"--plot needs matplotlib, which is not installed; {INSTALL_HINT}") from None
    strategies = report["strategies"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8.5))
    try:
        for s in strategies:
            ys = [100 * v for v in series[s["strategy"]]]
            top.plot(range(len(ys)), ys, label=f"{s['strategy']} (steady state {100 * s['useful_capacity']:.1f}%)",
                     linewidth=1.0)
        top.axvline(report["steady_state_from"], color="grey", linestyle=":", linewidth=1, label="steady state from")
        top.set_ylim(0, 105)
        top.set_xlabel("tick")
        top.set_ylabel("useful GPU capacity allocated (%)")
        top.set_title(f"{report['cluster']['gpus']} GPUs, {report['workload']['description']}")
        top.legend(loc="lower right", fontsize=8)
        top.grid(alpha=0.3)

        shapes: list[str] = []
        for s in strategies:
            shapes += [k for k in s["by_shape"] if k not in shapes]
        width = 0.8 / max(1, len(strategies))
        for i, s in enumerate(strategies):
            xs = [j + (i - (len(strategies) - 1) / 2) * width for j in range(len(shapes))]
            ys = [s["by_shape"].get(k, {}).get("wait_per_run") or 0.0 for k in shapes]
            bottom.bar(xs, ys, width=width, label=s["strategy"])
        bottom.set_xticks(range(len(shapes)))
        bottom.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        bottom.set_ylabel("mean wait / mean run time")
        bottom.set_title("wait by request shape (steady-state arrivals that were placed; none placed: no bar)")
        bottom.legend(fontsize=8)
        bottom.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(path, dpi=100)
        except OSError as e:
            raise SimulateError(f"--plot {path}: cannot write the image: {e.strerror or e}") from None
    finally:
        plt.close(fig)
