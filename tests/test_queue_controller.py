"""The controller's queue policy, run for real against the API emulator: an 8-GPU pod among a stream of
1-GPU pods gets the node reserved and starts while the stream goes on; priority orders the work queue."""

from __future__ import annotations

import asyncio

import pytest

from controller.operator.queue import WorkQueue
from controller.queuepolicy import QueueSettings
from tests.support.cluster import claim, is_allocated, pod, request, run

pytestmark = pytest.mark.timeout(90)

_allocated = is_allocated


async def _stream_with_a_big_pod(cl, rounds: int) -> dict:
    """Eight 1-GPU pods fill node-a; an 8-GPU pod arrives; then, round after round, the oldest small pod
    ends (deleted) and a new one arrives. Returns what happened."""
    cl.add_node("node-a", "H100-SXM5-80GB:8")
    live: list[str] = []
    for i in range(8):
        cl.submit(pod(f"s{i}", [f"s{i}"]), claim(f"s{i}", [request()]))
        live.append(f"s{i}")
    for name in live:
        await cl.allocated(name)
    cl.submit(pod("big", ["big"]), claim("big", [request(count=8)]))
    n = 8
    after_reservation: list[str] = []
    reasons: set[str] = set()        # why small pods waited while the node was reserved
    big_at = None
    for r in range(rounds):
        await asyncio.sleep(0.3)
        if _allocated(cl, "big"):
            big_at = r
            break
        if cl.events("PartitaReserved"):
            reasons.update(why for p, why in cl.controller.why_pending.items() if p != "default/big")
        victim = next((x for x in live if _allocated(cl, x)), None)
        if victim is not None:
            live.remove(victim)
            cl.server.delete("pods", victim, "default")
        name = f"s{n}"
        n += 1
        cl.submit(pod(name, [name]), claim(name, [request()]))
        live.append(name)
        if cl.events("PartitaReserved"):
            after_reservation.append(name)
    return {"big_at": big_at, "after_reservation": after_reservation, "live": live, "reasons": reasons}


def test_an_8_gpu_pod_among_a_stream_of_small_ones_gets_the_node_reserved_and_starts() -> None:
    async def scenario(cl):
        got = await _stream_with_a_big_pod(cl, rounds=60)
        assert got["big_at"] is not None, cl.controller.why_pending
        [(_, _, message)] = cl.events("PartitaReserved")
        assert message.startswith("reserved node-a (8 GPUs) for default/big, waiting ")
        # small pods that arrived once the node was reserved were not given its GPUs before the big pod
        late = [x for x in got["after_reservation"] if x in got["live"]]
        assert late and not any(_allocated(cl, x) for x in late)
        assert any("8 GPU(s) on node-a are reserved for default/big" in why for why in got["reasons"])
    run(scenario, queue=QueueSettings(reserve_after=1.0, max_reservations=1))


def test_without_reservations_the_stream_keeps_the_big_pod_waiting() -> None:
    """The same stream with the policy's reservations off: small pods take every GPU that frees."""
    async def scenario(cl):
        got = await _stream_with_a_big_pod(cl, rounds=25)
        assert got["big_at"] is None
        assert not cl.events("PartitaReserved")
        assert "default/big" in cl.controller.why_pending
    run(scenario, queue=QueueSettings(max_reservations=0))


def test_the_work_queue_hands_out_releases_first_then_pods_by_priority_then_age() -> None:
    async def main():
        pods = {"a": (0, "2026-01-01T00:00:02Z"), "b": (0, "2026-01-01T00:00:01Z"), "vip": (10, "2026-01-01T00:00:09Z")}

        def rank(k: str) -> tuple:
            if not k.startswith("pod:"):
                return (0,)
            prio, created = pods[k[4:]]
            return (1, -prio, created, k)

        q = WorkQueue(0.1, 1.0, rank=rank)
        for k in ("pod:a", "pod:b", "pod:vip", "claim:x", "pod:a"):
            q.add(k)
        assert len(q) == 4                      # queued twice, handed out once
        got = [await q.get() for _ in range(4)]
        assert got == ["claim:x", "pod:vip", "pod:b", "pod:a"]
        # a key in backoff is not handed out before its time; add_now ends the backoff
        q.backoff("pod:a")
        q.add("pod:a")
        assert q.pop() is None
        q.add_now("pod:a")
        assert q.pop() == "pod:a"
    asyncio.run(main())


def test_a_higher_priority_pod_gets_the_last_gpu() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(pod("holder", ["h"]), claim("h", [request()]))
        await cl.allocated("h")
        cl.submit(pod("low", ["low"]), claim("low", [request()]))
        cl.submit(pod("high", ["high"], priority=1000), claim("high", [request()]))
        await cl.server.wait_for(lambda _: ("default/low" in cl.controller.why_pending
                                            and "default/high" in cl.controller.why_pending) or None)
        cl.server.delete("pods", "holder", "default")
        await cl.allocated("high")
        await asyncio.sleep(0.5)
        assert not _allocated(cl, "low")
    run(scenario, retry_min=0.5, retry_max=0.5)


def test_a_bad_queue_flag_exits_2_naming_the_flag(caplog: pytest.LogCaptureFixture) -> None:
    import argparse

    from controller.operator import main as operator_main

    p = argparse.ArgumentParser()
    operator_main.add_arguments(p)
    args = p.parse_args(["--queue-max-reservations", "-1", "--health-port", "-1", "--metrics-port", "-1"])
    assert operator_main.run(args) == 2
    assert "--queue-max-reservations -1: must be 0 or more (0 turns reservations off)" in caplog.text
    args = p.parse_args(["--queue-reserve-min-gpus", "nan", "--health-port", "-1", "--metrics-port", "-1"])
    assert operator_main.run(args) == 2
    assert "--queue-reserve-min-gpus nan: must be 0 or more GPUs" in caplog.text


def test_pods_of_one_priority_and_age_are_tried_in_the_order_they_came() -> None:
    """creationTimestamp has one-second resolution: pods created in the same second are tried in the order
    the controller saw them, not by name (a name order let a later pod take the GPU of an earlier one)."""
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(pod("holder", ["h"]), claim("h", [request()]))
        await cl.allocated("h")
        cl.submit(pod("zz-first", ["first"]), claim("first", [request()]))
        cl.submit(pod("aa-second", ["second"]), claim("second", [request()]))
        await cl.server.wait_for(lambda _: ("default/zz-first" in cl.controller.why_pending
                                            and "default/aa-second" in cl.controller.why_pending) or None)
        cl.server.delete("pods", "holder", "default")
        await cl.allocated("first")
        await asyncio.sleep(0.5)
        assert not _allocated(cl, "second")
    run(scenario, retry_min=0.5, retry_max=0.5)
