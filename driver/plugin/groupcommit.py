"""Group commit of the plugin's calls: the work of concurrent calls runs as one batch, whose checkpoint
is written (and fsynced) once, and every call is answered only after that write.

Each call submits its work item and waits. One runner at a time takes everything submitted so far and
hands it to ``run_batch`` in a worker thread (its blocking I/O — checkpoint, CDI specs, NVML, MPS
daemons — never stalls the event loop, which meanwhile receives the next calls and reads their claims);
what arrives while a batch runs forms the next batch. ``run_batch`` returns one answer per item, in
order. An exception from ``run_batch`` is every item's answer (each caller sees it raised).

Batches split by arrival cost a session each (checkpoint read, write, two fsyncs). A caller that will
submit soon (a NodePrepareResources call still reading its claims from the API server) says so with
:meth:`GroupCommit.arriving`; while such calls are under way, the runner waits for them before it takes a
batch, at most ``gather_window`` seconds after the oldest waiting item was submitted. A call alone (nothing
arriving) is run at once.

A caller that is cancelled (the kubelet's deadline) stops waiting, but its item still runs with its
batch: the work is idempotent, and the kubelet asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable, Generic, Iterator, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")


#: how long a batch waits at most for calls that are arriving (seconds)
GATHER_WINDOW = 0.010


class GroupCommit(Generic[Item, Answer]):
    def __init__(self, run_batch: Callable[[list[Item]], list[Answer]], *, gather_window: float = GATHER_WINDOW):
        self._run_batch = run_batch
        self.gather_window = gather_window
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[tuple[Item, asyncio.Future]] = []
        self._runner: asyncio.Task | None = None
        self._arriving = 0
        self._arrived: asyncio.Event | None = None
        #: sizes of the batches run so far (the last 1024), for tests and benchmarks
        self.batch_sizes: list[int] = []

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:          # a new event loop (tests run one per call): nothing carries over
            self._loop, self._queue, self._runner = loop, [], None
            self._arriving, self._arrived = 0, asyncio.Event()
        return loop

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around the part of a call before it submits (reading its claims): a batch about to start waits
        for it (see the module doc). Leave it before submitting."""
        self._bind()
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._arrived is not None:
                self._arrived.set()

    async def submit(self, item: Item) -> Answer:
        loop = self._bind()
        fut: asyncio.Future = loop.create_future()
        self._queue.append((item, fut))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name="group-commit")
        return await fut

    async def _gather(self) -> None:
        """Wait while calls are arriving, at most ``gather_window`` from now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather_window
        while self._arriving > 0 and self._arrived is not None:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _run(self) -> None:
        while self._queue:
            await self._gather()
            batch, self._queue = self._queue, []
            self.batch_sizes = self.batch_sizes[-1023:] + [len(batch)]
            try:
                answers = await asyncio.to_thread(self._run_batch, [item for item, _ in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} items got {len(answers)} answers")
            except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                    raise
                continue
            for (_, fut), answer in zip(batch, answers):
                if not fut.done():
                    fut.set_result(answer)
