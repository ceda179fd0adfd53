"""What ``partita simulate`` compares: an allocator strategy, how requests are rounded, and the queue policy.

* ``first-fit``: kube-scheduler's allocator (upstream device order, nodes in the order given);
* ``pack``: Partita's controller default (:class:`controller.allocator.strategies.Pack`);
* ``whole-gpu-only``: the device-plugin world — every request rounded up to whole GPUs (a MIG device or a
  share takes a whole GPU), placed first-fit.

Every strategy here retries pending requests in arrival order each tick (:class:`ArrivalOrder`).

Extension point — a queue-aware strategy (the issue's next item: e.g. holding back small work while a
large job waits, so it stops backfilling the GPUs that job needs) is a new :class:`QueuePolicy` and one
:data:`SIM_STRATEGIES` entry that uses it; the event loop (:mod:`.engine`) asks the policy, each tick,
which pending requests to try and in which order, and needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

from controller.allocator import Allocator

from .errors import SimulateError
from .shapes import Shape, whole_gpu_equivalent
from .workload import Request


class QueuePolicy(Protocol):
    """Which pending requests the event loop tries this tick, in order. It may leave some out (they stay
    pending) — that is how a policy reserves capacity for a request it wants placed first."""

    name: str

    def order(self, pending: Sequence[Request], now: int) -> Iterable[Request]: ...


class ArrivalOrder:
    """Every pending request, oldest first (what a scheduler retrying its queue does)."""

    name = "arrival-order"

    def order(self, pending: Sequence[Request], now: int) -> Iterable[Request]:
        return pending


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
