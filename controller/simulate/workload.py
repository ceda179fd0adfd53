"""Workloads: requests with an arrival tick, a lifetime and a shape — from a built-in mix (seeded Poisson
arrivals at a given share of the cluster's capacity) or from a trace file (:mod:`.trace`).

Built-in mixes (each shape of a mix equally likely):

* ``whole``: whole-GPU jobs of 1, 2, 4 and 8 GPUs;
* ``mig``: one MIG device of every size the cluster's GPUs offer (``+me`` variants left out);
* ``shared``: GPU shares of 5, 10, 20 and 40Gi;
* ``mixed``: a third each of the three families above.

The arrival rate makes the offered load (useful capacity asked for, times lifetime, per tick) the
given share of the cluster's GPUs: ``rate = load * GPUs / (mean useful size * mean lifetime)``.
Lifetimes are exponential with the given mean (at least 1 tick).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .cluster import Cluster
from .errors import SimulateError
from .shapes import Shape

MIXES = ("whole", "mig", "shared", "mixed")
_GI = 1024**3


@dataclass(frozen=True)
class Request:
    id: int
    arrival: int           # tick it arrives
    duration: int          # ticks it runs once placed (>= 1)
    shape: Shape
    source: str = ""       # "FILE line N" for trace requests (for error messages)


def mix_shapes(mix: str, cluster: Cluster) -> list[list[Shape]]:
    """The mix as families of shapes (families equally likely, shapes equally likely within one)."""
    whole = [Shape("gpu", count=n) for n in (1, 2, 4, 8)]
    mig = [Shape("mig", profile=name) for name, _ in cluster.mig_profiles()]
    shared = [Shape("shared", memory=n * _GI) for n in (5, 10, 20, 40)]
    if mix in ("mig", "mixed") and not mig:
        raise SimulateError(f"--mix {mix}: no GPU of the cluster offers MIG; add a MIG-capable model "
                            "(e.g. --gpus H100-SXM5-80GB:8) or use --mix whole or shared")
    families = {"whole": [whole], "mig": [mig], "shared": [shared], "mixed": [whole, mig, shared]}
    try:
        return families[mix]
    except KeyError:
        raise SimulateError(f"unknown --mix {mix!r}; use one of {', '.join(MIXES)}") from None


def useful_size(shape: Shape, cluster: Cluster) -> float:
    """GPUs' worth of capacity a shape asks for (see :func:`.metrics.useful`), on the cluster's GPUs on average."""
    if shape.kind == "gpu":
        return float(shape.count)
    if shape.kind == "mig":
        return cluster.mig_fraction(shape.profile)
    mean_memory = sum(g.memory for g in cluster.gpus) / len(cluster.gpus)
    return min(1.0, shape.memory / mean_memory)


def generate(mix: str, cluster: Cluster, *, ticks: int, load: float, mean_duration: float, seed: int) -> list[Request]:
    """Seeded Poisson arrivals over ``ticks`` ticks at ``load`` times the cluster's capacity."""
    if load <= 0:
        raise SimulateError(f"--load {load}: the offered load must be positive (1.25 = 125 % of capacity)")
    if mean_duration < 1:
        raise SimulateError(f"--mean-duration {mean_duration}: the mean lifetime must be at least 1 tick")
    families = mix_shapes(mix, cluster)
    mean_size = sum(sum(useful_size(s, cluster) for s in fam) / len(fam) for fam in families) / len(families)
    rate = load * len(cluster.gpus) / (mean_size * mean_duration)
    rng = random.Random(seed)
    out: list[Request] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= ticks:
            return out
        family = families[rng.randrange(len(families))]
        shape = family[rng.randrange(len(family))]
        duration = max(1, round(rng.expovariate(1.0 / mean_duration)))
        out.append(Request(len(out), int(t), duration, shape))


def offered_load(requests: list[Request], cluster: Cluster, ticks: int) -> float:
    """What the requests arriving in the first ``ticks`` ticks asked for, as a share of the cluster's
    capacity over those ticks (useful size times lifetime; a mix's realized value varies around --load)."""
    asked = sum(useful_size(r.shape, cluster) * r.duration for r in requests if r.arrival < ticks)
    return asked / (len(cluster.gpus) * max(1, ticks))


def check_shapes(requests: list[Request], cluster: Cluster) -> None:
    """Every MIG profile and GPU model a request names exists in the cluster, else an error naming the request."""
    profiles = dict(cluster.mig_profiles())
    models = {g.model for g in cluster.gpus}
    for r in requests:
        where = f"{r.source}: field 'request': " if r.source else f"request {r.id}: "
        if r.shape.model and r.shape.model not in models:
            raise SimulateError(f"{where}GPU model {r.shape.model!r} is not in the cluster (it has "
                                f"{', '.join(sorted(models))}); change the request or add such a node")
        if r.shape.kind == "mig" and r.shape.profile not in profiles and not any(
                r.shape.profile in g.mig_profiles for g in cluster.gpus):
            offered = ", ".join(profiles) or "none: no GPU of the cluster offers MIG"
            raise SimulateError(f"{where}MIG profile {r.shape.profile!r} is not offered by any GPU of the cluster "
                                f"(offered: {offered})")


__all__ = ["MIXES", "Request", "check_shapes", "generate", "mix_shapes", "offered_load", "useful_size"]
