"""Device-choice strategies. The search is upstream's; a strategy only orders candidates, so every
result is valid under the same rules and only the choice among valid results differs.

* ``first-fit``: upstream order (pools by driver/pool, slices by name, devices in slice order) and the
  nodes in the order given — identical results to kube-scheduler's allocator.
* ``pack`` (the controller's default): keeps GPUs unfragmented.
  - Nodes already in use come first (most devices allocated first), so empty nodes stay empty for
    large jobs.
  - Within a node, a GPU already serving the request's mode comes first: shared requests go to GPUs
    whose shared device already has shares (the fullest that still fits first), MIG requests to GPUs
    that already have MIG devices, whole-GPU requests to GPUs whose siblings are busy.
  - Among MIG placements, the one that blocks the least of what is still free on the GPU (weighted by
    size) wins, so small instances fill from the edge and 3g/4g/7g placements stay available.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import Protocol, Sequence

from .pools import CDevice, Pool, SliceIndex, available_counters
from .search import ReqData
from .types import AllocatedState, Node


class Strategy(Protocol):
    """What :class:`~controller.allocator.Allocator` asks of a strategy."""

    #: the name the operator's flags and the simulator use
    name: str
    #: False: the allocator keeps upstream's device order and never calls :meth:`order_devices` (so its
    #: results are upstream's, choice among equals included)
    orders_devices: bool
    #: True: ``allocate_on_nodes`` first retries the node where a claim of the same shape fitted last,
    #: before :meth:`order_nodes`' order (which is where a packing strategy would put it anyway, without
    #: ordering every node for every claim)
    sticky: bool

    def order_devices(self, req: ReqData, candidates: list[tuple[Pool, CDevice]],
                      allocated: AllocatedState) -> list[tuple[Pool, CDevice]]:
        """The candidates of one (sub)request on one node, in the order the search should try them (the
        same devices, reordered)."""
        ...

    def order_nodes(self, nodes: Sequence[Node], slices: SliceIndex, allocated: AllocatedState) -> list[Node]:
        """The candidate nodes in the order to try them. It must order any subset of ``nodes`` as it orders
        the whole (the allocator leaves out the nodes known to be full before asking)."""
        ...


class FirstFit:
    name = "first-fit"
    orders_devices = False
    sticky = False

    def order_devices(self, req: ReqData, candidates: list[tuple[Pool, CDevice]],
                      allocated: AllocatedState) -> list[tuple[Pool, CDevice]]:
        return candidates

    def order_nodes(self, nodes: Sequence[Node], slices: SliceIndex, allocated: AllocatedState) -> list[Node]:
        return list(nodes)


def _slice_mask(dev: CDevice) -> int:
    return _consumes_mask(dev.consumes)


@lru_cache(maxsize=4096)
def _consumes_mask(consumes: tuple) -> int:
    """The memory slices a device's counter consumption covers, as bits (compiled consumptions are
    interned, so every node's same placement shares one entry)."""
    mask = 0
    for _, counters in consumes:
        for name, _ in counters:
            if name.startswith("memory-slice-"):
                mask |= 1 << int(name.rsplit("-", 1)[1])
    return mask


@lru_cache(maxsize=65536)
def _blocked(candidate: int, used: int, others: tuple[tuple[int, int], ...]) -> int:
    """Weight (memory slices) of the still-possible placements that taking ``candidate`` rules out."""
    return sum(size for mask, size in others if mask & candidate and not mask & used)


class _PoolLayout:
    """Static facts of a pool's devices for packing (depends on the slices only)."""

    def __init__(self, pool: Pool):
        self.devices: list[tuple[CDevice, str, int]] = []        # (device, parent GPU, memory-slice mask)
        self.mig: dict[str, list[tuple[int, int]]] = {}           # parent -> [(mask, size)] of its MIG devices
        self.counter_set: dict[str, str] = {}                     # parent -> counter set name
        #: counter set -> ((memory-slice counter name, its bit), ...)
        self.slice_bits: dict[str, tuple[tuple[str, int], ...]] = {}
        for dev in pool.devices():
            parent = dev.parent or dev.name
            mask = _slice_mask(dev)
            self.devices.append((dev, parent, mask))
            if dev.type == "mig":
                self.mig.setdefault(parent, []).append((mask, bin(mask).count("1")))
            if dev.consumes and parent not in self.counter_set:
                self.counter_set[parent] = dev.consumes[0][0]
        self.mig_tuples = {k: tuple(v) for k, v in self.mig.items()}
        for cs in set(self.counter_set.values()):
            self.slice_bits[cs] = tuple((name, 1 << int(name.rsplit("-", 1)[1]))
                                        for name in pool.counter_sets.get(cs, {}) if name.startswith("memory-slice-"))
        self.by_name = {d.name: (d, p, m) for d, p, m in self.devices}
        self.mask_of = {id(d): m for d, _, m in self.devices}


class _GpuView:
    """What a pool's GPUs are doing, from the allocated state."""

    def __init__(self, pool: Pool, layout: _PoolLayout, allocated: AllocatedState):
        avail = available_counters(pool, allocated)
        self.mode: dict[str, str] = {}           # parent GPU -> type of an allocated device
        self.busy: dict[str, int] = {}           # parent GPU -> devices allocated
        self.shared_load: dict[str, Fraction] = {}
        self.used_slices: dict[str, int] = {}
        for name in allocated.allocated_in_pool(pool.driver, pool.name):
            entry = layout.by_name.get(name)
            if entry is None:
                continue
            dev, parent, _ = entry
            self.busy[parent] = self.busy.get(parent, 0) + 1
            if dev.type:
                self.mode[parent] = dev.type
            if dev.allow_multiple:
                consumed = allocated.capacity.get(dev.id, {})
                total = sum((q.value for q in consumed.values()), Fraction(0))
                cap = sum((q.value for _, q, _ in dev.capacity), Fraction(0)) or Fraction(1)
                self.shared_load[parent] = total / cap
        for parent, cs in layout.counter_set.items():
            used = 0
            have = avail.get(cs, {})
            for name, bit in layout.slice_bits.get(cs, ()):
                value = have.get(name)
                if value is not None and value <= 0:
                    used |= bit
            self.used_slices[parent] = used


class Pack:
    name = "pack"
    orders_devices = True
    sticky = True   # retry the node that took the same kind of claim last (see Allocator._node_order)

    def _view(self, pool: Pool, allocated: AllocatedState) -> tuple[_PoolLayout, _GpuView]:
        layout = pool.strategy_cache.get("pack")
        if layout is None:
            layout = pool.strategy_cache["pack"] = _PoolLayout(pool)
        sig = allocated.pool_signature(pool.driver, pool.name)
        got = pool.strategy_cache.get("pack-view")
        if got is None or got[0] != sig:
            got = pool.strategy_cache["pack-view"] = (sig, _GpuView(pool, layout, allocated))
        return layout, got[1]

    def order_devices(self, req: ReqData, candidates: list[tuple[Pool, CDevice]],
                      allocated: AllocatedState) -> list[tuple[Pool, CDevice]]:
        views: dict[int, tuple[_PoolLayout, _GpuView]] = {}

        def key(item: tuple[int, tuple[Pool, CDevice]]) -> tuple:
            position, (pool, dev) = item
            got = views.get(id(pool))
            if got is None:
                got = views[id(pool)] = self._view(pool, allocated)
            layout, view = got
            parent = dev.parent or dev.name
            mode = view.mode.get(parent)
            same_mode = 0 if mode == dev.type else (1 if mode is None else 2)
            if dev.type == "mig":
                blocked = _blocked(layout.mask_of[id(dev)], view.used_slices.get(parent, 0),
                                   layout.mig_tuples.get(parent, ()))
                return (same_mode, -view.busy.get(parent, 0), blocked, position)
            if dev.allow_multiple:
                return (same_mode, -view.shared_load.get(parent, Fraction(0)), position)
            return (same_mode, position)

        return [c for _, c in sorted(enumerate(candidates), key=key)]

    def order_nodes(self, nodes: Sequence[Node], slices: SliceIndex, allocated: AllocatedState) -> list[Node]:
        """Nodes in use first (most allocated devices first), then the others in the given order (a subset
        is ordered as the whole is). One pass over the candidates: the devices allocated per node are kept
        up to date from the allocated state's journal (:class:`NodeUse`)."""
        use = self._use
        if use is None:
            use = self._use = NodeUse()
        used = use.sync(slices, allocated)
        if not used:
            return list(nodes)
        busy, idle = [], []
        for n in nodes:
            (busy if n.name in used else idle).append(n)
        busy.sort(key=lambda n: -used[n.name])
        return busy + idle

    _use: "NodeUse | None" = None


class NodeUse:
    """Devices allocated per node: for each pool holding any, its length counted for the node
    :meth:`SliceIndex.pool_node` names (node-local pools only). Brought up to date from the allocated
    state's journal, pool by pool; rebuilt for another state or slice index, after a slice change, or when
    the journal no longer reaches back."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}
        self._pools: dict[tuple[str, str], tuple[str, int]] = {}     # pool -> (its node, devices allocated)
        self._key: tuple = ()
        self._mark = 0

    def sync(self, slices: SliceIndex, allocated: AllocatedState) -> dict[str, int]:
        key = (allocated.uid, id(slices), slices.version)
        if key != self._key:
            self._key, self._mark = key, allocated.changes
            self.used, self._pools = {}, {}
            for pid, names in allocated.by_pool.items():
                self._count(slices, allocated, pid)
            return self.used
        if allocated.changes != self._mark:
            pools = allocated.changed_pools(self._mark)
            self._mark = allocated.changes
            if pools is None:
                self._key = ()
                return self.sync(slices, allocated)
            for pid in set(pools):
                self._count(slices, allocated, pid)
        return self.used

    def _count(self, slices: SliceIndex, allocated: AllocatedState, pid: tuple[str, str]) -> None:
        old = self._pools.pop(pid, None)
        if old is not None:
            left = self.used[old[0]] - old[1]
            if left:
                self.used[old[0]] = left
            else:
                del self.used[old[0]]
        names = allocated.by_pool.get(pid)
        if names:
            node = slices.pool_node(*pid)
            if node is not None:
                self._pools[pid] = (node, len(names))
                self.used[node] = self.used.get(node, 0) + len(names)


STRATEGIES: dict[str, type] = {"first-fit": FirstFit, "pack": Pack}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown allocation strategy {name!r}; use one of {', '.join(STRATEGIES)}") from None
