"""The nodes known not to fit a kind of claim, so that full nodes cost nothing per claim.

The outcome of allocating claims on a node depends on the claims' content (their *shape*: requests and
the classes they use, names left out), the node (name and labels), the slices the node may use
(:meth:`SliceIndex.node_key`) and what other claims hold in the node's pools. A node where a shape did not
fit is remembered as *full for that shape* with the reason (filled in when one is asked for) and skipped
by :meth:`Allocator.allocate_on_nodes` until one of those changes:

* a change of what the node's pools hold (an allocation added or released, in any of the node's pools),
  read from the allocated state's journal (:meth:`AllocatedState.changed_pools`) — no per-node work on
  the nodes nothing changed on; a change in a pool of slices without ``nodeName`` (network-attached
  devices any node may use) drops everything;
* a change of the slices (any upsert or delete bumps :attr:`SliceIndex.version`): entries whose node's
  slices changed are dropped (all of them when a slice without ``nodeName`` changed, as it may target any
  node);
* a different node object of the same name with other labels (checked on each lookup);
* another allocated-state or slice-index object: everything is dropped (the journal only describes one).

So a skipped node is exactly one where ``Allocator.allocate`` would find no solution again; the index
never hides a node that fits (tests/test_nodeindex.py checks it against the un-indexed search). The
candidate nodes are filtered with one dictionary lookup per node, and the strategy orders only the rest.
"""

from __future__ import annotations

from .pools import SliceIndex
from .types import AllocatedState, Node

#: entries kept at most (shapes x nodes); beyond it the index starts over
MAX_ENTRIES = 100_000


class _Entry:
    __slots__ = ("node", "node_key", "reason")

    def __init__(self, node: Node, node_key: tuple[int, int], reason: str):
        self.node = node
        self.node_key = node_key
        self.reason = reason


class FullNodes:
    """Per claim shape, the nodes where it does not fit (see the module docstring)."""

    def __init__(self) -> None:
        self._by_shape: dict[str, dict[str, _Entry]] = {}
        self._entries = 0
        self._state_uid = 0
        self._mark = 0                  # the allocated state's changes already applied
        self._slices_id = 0
        self._slices_version = -1

    # -- keeping it true ---------------------------------------------------------------------------
    def sync(self, slices: SliceIndex, allocated: AllocatedState) -> None:
        """Drop what changes in the allocated state and the slices since the last call made untrue."""
        if allocated.uid != self._state_uid or id(slices) != self._slices_id:
            self.clear()
            self._state_uid, self._mark = allocated.uid, allocated.changes
            self._slices_id, self._slices_version = id(slices), slices.version
            return
        if allocated.changes != self._mark:
            pools = allocated.changed_pools(self._mark)
            self._mark = allocated.changes
            if pools is None:
                self.clear()
            elif self._entries:
                for pid in set(pools):
                    names = slices.pool_node_names(*pid)
                    if names is None:         # a pool any node may use (allNodes, nodeSelector)
                        self.clear()
                        break
                    for name in names:
                        self._drop_node(name)
        if slices.version != self._slices_version:
            self._slices_version = slices.version
            for entries in self._by_shape.values():
                stale = [n for n, e in entries.items() if e.node_key != slices.node_key(n)]
                for n in stale:
                    del entries[n]
                self._entries -= len(stale)

    def clear(self) -> None:
        self._by_shape.clear()
        self._entries = 0

    def _drop_node(self, name: str) -> None:
        for entries in self._by_shape.values():
            if entries.pop(name, None) is not None:
                self._entries -= 1

    # -- using it ----------------------------------------------------------------------------------
    def for_shape(self, shape: str) -> dict[str, _Entry]:
        """The shape's entries by node name (read-only for callers: use :meth:`is_full` and :meth:`add`)."""
        got = self._by_shape.get(shape)
        if got is None:
            got = self._by_shape[shape] = {}
        return got

    @staticmethod
    def is_full(entries: dict[str, _Entry], node: Node) -> bool:
        e = entries.get(node.name)
        return e is not None and (e.node is node or e.node == node)

    @staticmethod
    def reason(entries: dict[str, _Entry], node: Node) -> str | None:
        e = entries.get(node.name)
        return e.reason if e is not None and (e.node is node or e.node == node) else None

    def add(self, shape: str, node: Node, slices: SliceIndex, reason: str = "") -> None:
        """Remember that ``shape`` does not fit on ``node`` as things are now (after :meth:`sync`)."""
        if self._entries >= MAX_ENTRIES:
            self.clear()
        entries = self.for_shape(shape)
        if node.name not in entries:
            self._entries += 1
        entries[node.name] = _Entry(node, slices.node_key(node.name), reason)

    def __len__(self) -> int:
        return self._entries
