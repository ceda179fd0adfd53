"""The event loop: one strategy over one list of requests, tick by tick.

Each tick: claims whose lifetime ended are released (``AllocatedState.remove_allocation``), the tick's
arrivals join the pending queue, and the queue policy's pending requests are tried in its order
(``Allocator.allocate_on_nodes`` over every node; a placed claim is added with
``AllocatedState.add_allocation``). Then the tick's figures are sampled. The slice index, the allocator
(with its caches) and the allocated state live for the whole run.

Allocation is monotone — holding more never makes a claim fit — so a node where a shape did not fit
stays so until something on that node is released. The loop remembers, per shape, those nodes and
offers the allocator only the others (none left: the request is not tried). Every strategy picks the
first fitting node in its order, and leaving out nodes that cannot fit keeps the order of the rest, so
the choice is the same as over every node — only cheaper. Requests whose shape does not fit the empty
cluster are set aside as unplaceable at once.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from controller.allocator import AllocatedState, AllocationError, Allocator, DeviceID, Node
from controller.allocator import NOTHING, Unavailable
from driver.api import constants as C

from .cluster import Cluster, Gpu
from .errors import SimulateError
from .shapes import Shape, claim_for
from .strategies import SimStrategy
from .workload import Request

#: a trace run without --ticks goes on until every request ended; this bounds it
MAX_DRAIN_TICKS = 1_000_000
_EPS = 1e-9


@dataclass
class RunResult:
    strategy: str
    ticks: int = 0
    useful: list[float] = field(default_factory=list)     # per tick: useful capacity / GPUs
    held: list[float] = field(default_factory=list)       # per tick: capacity held / GPUs
    gpu_frag: list[float] = field(default_factory=list)   # per tick: GPU fragmentation (see metrics)
    node_frag: list[float] = field(default_factory=list)  # per tick: node fragmentation
    pending: list[int] = field(default_factory=list)      # per tick: requests waiting
    starts: dict[int, int] = field(default_factory=dict)  # request id -> tick placed
    unplaceable: set[int] = field(default_factory=set)    # ids whose shape never fits the empty cluster
    attempts: int = 0                                      # allocator calls
    seconds: float = 0.0


def useful(shape: Shape, gpu: Gpu, cluster: Cluster) -> float:
    """Capacity of one GPU a request of ``shape`` put to use there: a whole GPU 1, a MIG device its memory
    slices over the GPU's, a share its memory over the GPU's (at most 1)."""
    if shape.kind == "gpu":
        return 1.0
    if shape.kind == "mig":
        if shape.profile in gpu.mig_profiles and gpu.memory_slices:
            return gpu.mig_profiles[shape.profile] / gpu.memory_slices
        return cluster.mig_fraction(shape.profile)
    return min(1.0, shape.memory / gpu.memory)


class _Accounting:
    """Per GPU, the share held; in total, the useful capacity."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.held = [0.0] * len(cluster.gpus)
        self.useful = 0.0
        names = sorted({g.node for g in cluster.gpus})
        self.node_of = [names.index(g.node) for g in cluster.gpus]
        self.nodes = len(names)

    def apply(self, holds: list[tuple[int, float]], gain: float, sign: int) -> None:
        for gpu, share in holds:
            self.held[gpu] += sign * share
            if abs(self.held[gpu]) < _EPS:
                self.held[gpu] = 0.0
        self.useful += sign * gain

    def sample(self, out: RunResult) -> None:
        n = len(self.held)
        free_total = 0.0
        free_partial = 0.0
        busy_nodes = [False] * self.nodes
        for i, h in enumerate(self.held):
            free = max(0.0, 1.0 - h)
            free_total += free
            if h > _EPS:
                busy_nodes[self.node_of[i]] = True
                if free > _EPS:
                    free_partial += free
        idle = [i for i, h in enumerate(self.held) if h <= _EPS]
        stranded = sum(1 for i in idle if busy_nodes[self.node_of[i]])
        out.useful.append(max(0.0, self.useful) / n)
        out.held.append(min(1.0, sum(self.held) / n))
        out.gpu_frag.append(free_partial / free_total if free_total > _EPS else 0.0)
        out.node_frag.append(stranded / len(idle) if idle else 0.0)


def simulate(strategy: SimStrategy, cluster: Cluster, requests: list[Request], ticks: int | None) -> RunResult:
    """Run ``requests`` (sorted by arrival) through ``strategy``; ``ticks`` None: until all ended."""
    started = time.perf_counter()
    out = RunResult(strategy.name)
    allocator = strategy.new_allocator()
    queue = strategy.queue()
    state = AllocatedState()
    acct = _Accounting(cluster)
    claims: dict[Shape, dict] = {}
    fits_empty: dict[Shape, bool] = {}
    running: list[tuple[int, int, dict, list[tuple[int, float]], float]] = []   # (end, id, allocation, holds, gain)
    pending: list[Request] = []
    #: (shape, GPUs withheld from it) -> nodes where it does not fit now
    failed: dict[tuple[Shape, frozenset[int]], set[str]] = {}
    gpu_devices = _device_sets(cluster)
    node_of_gpu = [g.node for g in cluster.gpus]
    horizon = ticks if ticks is not None else MAX_DRAIN_TICKS
    nxt = 0
    tick = 0
    while tick < horizon:
        while running and running[0][0] <= tick:
            _, _, allocation, holds, gain = heapq.heappop(running)
            state.remove_allocation(allocation)
            acct.apply(holds, gain, -1)
            freed = {node_of_gpu[g] for g, _ in holds}
            for nodes in failed.values():
                nodes -= freed
        if ticks is None and nxt >= len(requests) and not pending and not running:
            break
        while nxt < len(requests) and requests[nxt].arrival <= tick:
            req = requests[nxt]
            nxt += 1
            shape = strategy.shape_for(req.shape)
            if shape not in fits_empty:
                fits_empty[shape] = _fits_empty(strategy, cluster, _claim(claims, shape))
            if fits_empty[shape]:
                pending.append(req)
            else:
                out.unplaceable.add(req.id)
        if pending:
            placed: set[int] = set()
            for req, withheld in queue.plan(pending, tick, running, cluster):
                shape = strategy.shape_for(req.shape)
                ruled_out = failed.setdefault((shape, withheld), set())
                if len(ruled_out) >= len(cluster.nodes):
                    continue
                candidates = [n for n in cluster.nodes if n.name not in ruled_out] if ruled_out else cluster.nodes
                out.attempts += 1
                unavailable = gpu_devices(withheld) if withheld else NOTHING
                choice = _allocate(allocator, cluster, candidates, _claim(claims, shape), state, req, unavailable)
                if choice is None:
                    ruled_out.update(n.name for n in candidates)
                    continue
                state.add_allocation(choice)
                holds = [cluster.held(r) for r in (choice.get("devices") or {}).get("results") or []]
                gain = sum(useful(req.shape, cluster.gpus[g], cluster) for g, _ in holds)
                acct.apply(holds, gain, 1)
                heapq.heappush(running, (tick + req.duration, req.id, choice, holds, gain))
                out.starts[req.id] = tick
                placed.add(req.id)
                # what is now held changes nothing for other withheld sets' ruled-out nodes (holding more
                # never makes a claim fit), so the memo stays right
            if placed:
                pending = [r for r in pending if r.id not in placed]
            if len(failed) > 256:      # withheld sets of past reservations: drop them
                for k in [k for k in failed if k[1]]:
                    del failed[k]
        acct.sample(out)
        out.pending.append(len(pending))
        tick += 1
    out.ticks = tick
    out.seconds = time.perf_counter() - started
    return out


def _claim(cache: dict[Shape, dict], shape: Shape) -> dict:
    got = cache.get(shape)
    if got is None:
        got = cache[shape] = claim_for(shape, "sim-" + str(len(cache)))
    return got


def _fits_empty(strategy: SimStrategy, cluster: Cluster, claim: dict) -> bool:
    choice = strategy.new_allocator().allocate_on_nodes(cluster.nodes, [claim], cluster.slices, cluster.classes,
                                                        AllocatedState())
    return choice.node is not None


def _device_sets(cluster: Cluster):
    """GPU indices -> what withholding those GPUs from a request makes unavailable to it: a node all of
    whose GPUs are withheld by name (the allocator then does not try it at all), and of the other GPUs every
    published device (the whole GPU, its MIG placements, its shared device), which the allocator counts as
    held for the one call."""
    per_gpu: list[set[DeviceID]] = [set() for _ in cluster.gpus]
    for (pool, name), dev in cluster.devices.items():
        per_gpu[dev.gpu].add(DeviceID(C.DEFAULT_DRIVER_NAME, pool, name))
    gpus_of: dict[str, set[int]] = {}
    for g in cluster.gpus:
        gpus_of.setdefault(g.node, set()).add(g.index)
    memo: dict[frozenset[int], frozenset] = {}

    def devices(gpus: frozenset[int]) -> frozenset:
        got = memo.get(gpus)
        if got is None:
            if len(memo) > 1024:
                memo.clear()
            whole = {n for n, mine in gpus_of.items() if mine <= gpus}
            rest = [g for g in gpus if cluster.gpus[g].node not in whole]
            got = memo[gpus] = frozenset(whole).union(*(per_gpu[g] for g in rest))
        return got

    return devices


def _allocate(allocator: Allocator, cluster: Cluster, nodes: list[Node], claim: dict, state: AllocatedState,
              req: Request, unavailable: Unavailable = NOTHING) -> dict | None:
    try:
        choice = allocator.allocate_on_nodes(nodes, [claim], cluster.slices, cluster.classes, state, max_reasons=0,
                                             unavailable=unavailable)
    except AllocationError as e:
        where = req.source or f"request {req.id}"
        raise SimulateError(f"{where}: request {req.shape} cannot be allocated: {e}") from None
    return choice.results[0] if choice.node is not None else None
