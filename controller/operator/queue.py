"""The controller's work queue: keys to reconcile, in rank order, each at most once, with per-key backoff.

Keys are ``pod:NS/NAME``, ``claim:NS/NAME`` and ``taint:NAME``. The worker takes the lowest rank first
(``rank(key)``, given by the controller: releases and reports before allocations, then pods by the queue
policy's order — priority, then how long they wait), ties in the order they were queued. A key queued
while already queued keeps its place. A key in backoff is not handed out before its time (``due``
re-queues it), and ``done`` ends its backoff.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Callable

Rank = tuple


def _same_rank(key: str) -> Rank:
    return ()


class WorkQueue:
    def __init__(self, retry_min: float, retry_max: float, rank: Callable[[str], Rank] = _same_rank,
                 clock: Callable[[], float] = time.monotonic):
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.rank = rank
        self.clock = clock
        self._heap: list[tuple[Rank, int, str]] = []
        self._queued: set[str] = set()
        self._seq = itertools.count()
        self._ready = asyncio.Event()
        self._retry: dict[str, tuple[float, float]] = {}     # key -> (next attempt, current backoff)

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            heapq.heappush(self._heap, (self.rank(key), next(self._seq), key))
            self._ready.set()

    def add_now(self, key: str) -> None:
        """Queue it and forget its backoff (something relevant changed)."""
        self._retry.pop(key, None)
        self.add(key)

    def pop(self) -> str | None:
        """The next key whose backoff is not running (those are dropped: ``due`` queues them again)."""
        while self._heap:
            _, _, key = heapq.heappop(self._heap)
            self._queued.discard(key)
            due = self._retry.get(key)
            if due is not None and due[0] > self.clock():
                continue
            return key
        self._ready.clear()
        return None

    async def get(self) -> str:
        while True:
            key = self.pop()
            if key is not None:
                return key
            await self._ready.wait()

    # -- backoff -------------------------------------------------------------------------------
    def backoff(self, key: str, at_least: float = 0.0) -> float:
        """Try ``key`` again later: twice the last delay, within [retry_min, retry_max], at least ``at_least``."""
        _, cur = self._retry.get(key, (0.0, 0.0))
        nxt = min(max(cur * 2, self.retry_min, at_least), self.retry_max)
        self._retry[key] = (self.clock() + nxt, nxt)
        return nxt

    def done(self, key: str) -> None:
        self._retry.pop(key, None)

    def backing_off(self, key: str) -> bool:
        due = self._retry.get(key)
        return due is not None and due[0] > self.clock()

    def due(self) -> None:
        """Queue the keys whose backoff ended (the ticker calls this)."""
        now = self.clock()
        for key, (at, cur) in list(self._retry.items()):
            if at <= now:
                self._retry[key] = (0.0, cur)    # due: the worker runs it; a failure doubles ``cur``
                self.add(key)
