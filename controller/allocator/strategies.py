"""Device-choice strategies. The search is upstream's; a strategy only orders candidates.

* ``first-fit``: upstream order (pools by driver/pool, slices by name, devices in slice order) and the
  nodes in the order given — identical results to kube-scheduler's allocator.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from .pools import CDevice, Pool, SliceIndex
from .search import ReqData
from .types import AllocatedState, Node


class Strategy(Protocol):
    name: str

    def order_devices(self, req: ReqData, candidates: list[tuple[Pool, CDevice]],
                      allocated: AllocatedState) -> list[tuple[Pool, CDevice]]: ...

    def order_nodes(self, nodes: Sequence[Node], slices: SliceIndex, allocated: AllocatedState) -> list[Node]: ...


class FirstFit:
    name = "first-fit"

    def order_devices(self, req: ReqData, candidates: list[tuple[Pool, CDevice]],
                      allocated: AllocatedState) -> list[tuple[Pool, CDevice]]:
        return candidates

    def order_nodes(self, nodes: Sequence[Node], slices: SliceIndex, allocated: AllocatedState) -> list[Node]:
        return list(nodes)


STRATEGIES: dict[str, type] = {"first-fit": FirstFit}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown allocation strategy {name!r}; use one of {', '.join(STRATEGIES)}") from None
