"""What ``partita simulate`` compares: an allocator strategy, how requests are rounded, and the queue policy.

* ``first-fit``: kube-scheduler's allocator (upstream device order, nodes in the order given);
* ``pack``: Partita's controller default (:class:`controller.allocator.strategies.Pack`);
* ``queue``: Partita's controller with its queue-aware policy (:mod:`controller.queuepolicy`) over ``pack``:
  pending work by priority then age; a request waiting ``reserve_after`` ticks or more gets the GPUs closest
  to fitting it reserved, and other work backfills them only when it ends (its known duration) before they
  are expected to be free;
* ``whole-gpu-only``: the device-plugin world — every request rounded up to whole GPUs (a MIG device or a
  share takes a whole GPU), placed first-fit.

The event loop (:mod:`.engine`) asks the strategy's :class:`QueuePolicy`, each tick, which pending requests
to try, in which order, and which GPUs each may not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from controller.allocator import Allocator
from controller.queuepolicy import GpuSlot, QueueSettings, Waiting, plan

from .cluster import Cluster
from .errors import SimulateError
from .shapes import Shape, whole_gpu_equivalent
from .workload import Request

#: the simulator's queue-aware settings: reservations after half a mean lifetime (25 ticks by default) of waiting,
#: for up to 3 multi-GPU requests at once, the largest first; backfill by known duration (the simulator knows
#: each lifetime)
SIM_QUEUE_SETTINGS = QueueSettings(reserve_after=25, max_reservations=3, backfill="ends-before",
                                   reserve_for="largest", reserve_min=2)

NO_GPUS: frozenset[int] = frozenset()
#: (end tick, request id, allocation, [(GPU index, share held)], useful gain) of each running request
Running = Sequence[tuple[int, int, dict, list[tuple[int, float]], float]]


class QueuePolicy(Protocol):
    """Which pending requests the event loop tries this tick, in order, each with the GPU indices it may not
    use (withheld for another request). It may leave some out (they stay pending)."""

    name: str

    def plan(self, pending: Sequence[Request], now: int, running: Running,
             cluster: Cluster) -> Iterable[tuple[Request, frozenset[int]]]: ...


class ArrivalOrder:
    """Every pending request, oldest first (what a scheduler retrying its queue does), nothing withheld."""

    name = "arrival-order"

    def plan(self, pending: Sequence[Request], now: int, running: Running,
             cluster: Cluster) -> Iterable[tuple[Request, frozenset[int]]]:
        return ((r, NO_GPUS) for r in pending)


def gpus_needed(shape: Shape, cluster: Cluster) -> float:
    """GPUs' worth a request needs on one node (a MIG device or a share: its fraction of a GPU)."""
    if shape.kind == "gpu":
        return float(shape.count)
    if shape.kind == "mig":
        return cluster.mig_fraction(shape.profile)
    return min(1.0, shape.memory / max(g.memory for g in cluster.gpus))


class QueueAware:
    """:func:`controller.queuepolicy.plan` over the pending requests (all of priority 0: by age), the GPUs'
    expected free times taken from the running requests' known ends."""

    name = "queue-aware"

    def __init__(self, settings: QueueSettings = SIM_QUEUE_SETTINGS):
        self.settings = settings
        self._needs: dict[Shape, float] = {}

    def _needed(self, shape: Shape, cluster: Cluster) -> float:
        got = self._needs.get(shape)
        if got is None:
            got = self._needs[shape] = gpus_needed(shape, cluster)
        return got

    def plan(self, pending: Sequence[Request], now: int, running: Running,
             cluster: Cluster) -> Iterable[tuple[Request, frozenset[int]]]:
        s = self.settings
        if s.max_reservations == 0 or not any(now - r.arrival >= s.reserve_after
                                              and self._needed(r.shape, cluster) >= s.reserve_min for r in pending):
            return ((r, NO_GPUS) for r in pending)       # nobody to reserve for: arrival order
        ends: dict[int, int] = {}
        for end, _, _, holds, _ in running:
            for g, _ in holds:
                if ends.get(g, -1) < end:
                    ends[g] = end
        slots = [GpuSlot(g.index, g.node, g.index in ends, ends.get(g.index)) for g in cluster.gpus]
        by_key = {f"{r.id:09d}": r for r in pending}       # keys sort as ids: arrival order among equals
        waiting = [Waiting(k, r.arrival, 0, self._needed(r.shape, cluster), r.duration) for k, r in by_key.items()]
        p = plan(waiting, now, slots, self.settings)
        return ((by_key[w.key], frozenset(p.withheld(w))) for w in p.order)


def _same(shape: Shape) -> Shape:
    return shape


@dataclass(frozen=True)
class SimStrategy:
    name: str
    allocator_strategy: str                           # a controller.allocator strategy name
    description: str
    shape_for: Callable[[Shape], Shape] = _same        # what the request is turned into before allocation
    queue: Callable[[], QueuePolicy] = field(default=ArrivalOrder)

    def new_allocator(self) -> Allocator:
        return Allocator(strategy=self.allocator_strategy)


SIM_STRATEGIES: dict[str, SimStrategy] = {s.name: s for s in (
    SimStrategy("first-fit", "first-fit", "kube-scheduler's allocator: upstream order, first fit"),
    SimStrategy("pack", "pack", "Partita's controller: busy nodes and GPUs first, MIG placements that block least"),
    SimStrategy("queue", "pack", "Partita's controller with its queue policy: pack, plus reservations for "
                "requests that waited long, backfilled only by work that ends before", queue=QueueAware),
    SimStrategy("whole-gpu-only", "first-fit", "device-plugin world: every request rounded up to whole GPUs",
                shape_for=whole_gpu_equivalent),
)}


def get_strategies(names: Sequence[str]) -> list[SimStrategy]:
    out = []
    for n in names:
        if n not in SIM_STRATEGIES:
            raise SimulateError(f"unknown strategy {n!r}; use some of {', '.join(SIM_STRATEGIES)}")
        if SIM_STRATEGIES[n] not in out:
            out.append(SIM_STRATEGIES[n])
    return out
