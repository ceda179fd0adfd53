"""Group commit waits for calls that are still reading their claims (issue 18: batches split by arrival
cost a session each): a batch about to start takes the calls under way too, a lone call runs at once, and
a call that does not arrive within the window does not hold the others back."""

from __future__ import annotations

import asyncio

from driver.plugin.groupcommit import GroupCommit


def _recorder() -> tuple[GroupCommit[str, str], list[list[str]]]:
    batches: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        batches.append(list(items))
        return [f"done {i}" for i in items]
    return GroupCommit(run), batches


async def _yield(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_call_still_reading_its_claims_joins_the_batch_about_to_start() -> None:
    gc, batches = _recorder()
    gc.gather_window = 30.0       # only the arrival ends the wait here

    async def late(read: asyncio.Event) -> str:
        with gc.arriving():       # its GET is under way
            await read.wait()
        return await gc.submit("late")

    async def scenario() -> list[str]:
        read = asyncio.Event()
        other = asyncio.create_task(late(read))
        await _yield()            # 'late' is arriving
        first = asyncio.create_task(gc.submit("first"))
        await _yield()            # the runner has started and waits for 'late'
        assert batches == []
        read.set()
        return await asyncio.wait_for(asyncio.gather(first, other), 30)

    assert asyncio.run(scenario()) == ["done first", "done late"]
    assert batches == [["first", "late"]]


def test_a_lone_call_runs_at_once() -> None:
    gc, batches = _recorder()
    gc.gather_window = 3600.0     # a wait would never end within the test's guard

    async def scenario() -> str:
        with gc.arriving():
            pass                  # read, and no longer arriving when it submits
        return await asyncio.wait_for(gc.submit("alone"), 30)

    assert asyncio.run(scenario()) == "done alone"
    assert batches == [["alone"]]


def test_a_call_that_does_not_arrive_within_the_window_does_not_hold_the_batch() -> None:
    gc, batches = _recorder()
    gc.gather_window = 0.01

    async def scenario() -> tuple[str, str]:
        first_done = asyncio.Event()

        async def slow() -> str:
            with gc.arriving():
                await first_done.wait()    # arrives only once the first call was answered
            return await gc.submit("slow")

        other = asyncio.create_task(slow())
        await _yield()
        first = await asyncio.wait_for(gc.submit("first"), 30)
        first_done.set()
        return first, await asyncio.wait_for(other, 30)

    assert asyncio.run(scenario()) == ("done first", "done slow")
    assert batches == [["first"], ["slow"]]
