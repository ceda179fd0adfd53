"""The queue-aware policy (controller/queuepolicy.py) and the allocator's ``unavailable`` set it reaches the
allocator through."""

from __future__ import annotations

import pytest

from controller.allocator import AllocatedState, Allocator, DeviceID, Node
from controller.queuepolicy import GpuSlot, PolicyError, QueueSettings, Waiting, duration_text, order, plan
from tests.support.cluster import claim, node_slices, request
from controller.allocator import SliceIndex
from driver.api import constants as C
from driver.api.deviceclasses import device_classes

SETTINGS = QueueSettings(reserve_after=10, max_reservations=1)


def _slots(busy: dict[str, list[float | None]]) -> list[GpuSlot]:
    """node -> per GPU: None free, a number busy until then (nan: busy, end unknown)."""
    out = []
    for node, gpus in busy.items():
        for i, end in enumerate(gpus):
            if end is None:
                out.append(GpuSlot(f"{node}/{i}", node, False))
            else:
                out.append(GpuSlot(f"{node}/{i}", node, True, None if end != end else end))
    return out


def test_order_is_priority_then_age_then_key() -> None:
    items = [Waiting("b", since=5), Waiting("a", since=5), Waiting("old", since=1), Waiting("vip", since=9, priority=100)]
    assert [w.key for w in order(items)] == ["vip", "old", "a", "b"]


def test_nothing_is_reserved_before_the_bound() -> None:
    p = plan([Waiting("big", since=0, gpus=8)], now=9, gpus=_slots({"n1": [20.0] * 8}), settings=SETTINGS)
    assert p.reservations == [] and p.withheld(Waiting("small", since=9)) == set()


def test_the_node_closest_to_fitting_is_reserved_and_withheld_from_others() -> None:
    gpus = _slots({"n1": [None, 30.0, 40.0, None], "n2": [None, None, None, 50.0], "n3": [None, None]})
    big = Waiting("default/big", since=0, gpus=4)
    p = plan([big, Waiting("small", since=0)], now=12, gpus=gpus, settings=SETTINGS)
    [r] = p.reservations
    # n2 has one busy GPU (n1 two, n3 too few): closest to fitting
    assert r.node == "n2" and r.owner == big and r.start == 50.0
    assert p.withheld(Waiting("small", since=5)) == {"n2/0", "n2/1", "n2/2", "n2/3"}
    assert p.withheld(big) == set()                      # never from its owner
    assert r.describe(12 + 240) == "reserved n2 (4 GPUs) for default/big, waiting 4m"


def test_among_equally_busy_nodes_the_one_free_soonest_wins() -> None:
    gpus = _slots({"n1": [None, 90.0], "n2": [None, 20.0]})
    [r] = plan([Waiting("big", since=0, gpus=2)], 10, gpus, SETTINGS).reservations
    assert r.node == "n2"


def test_backfill_only_what_ends_before_and_only_when_durations_are_known() -> None:
    gpus = _slots({"n1": [None, 50.0]})
    ends_before = QueueSettings(reserve_after=10, backfill="ends-before")
    items = [Waiting("big", since=0, gpus=2), Waiting("short", 10, duration=30), Waiting("long", 10, duration=45),
             Waiting("unknown", 10)]
    p = plan(items, 10, gpus, ends_before)
    assert p.withheld(items[1]) == set()                  # 10 + 30 <= 50: done before the big one can start
    assert p.withheld(items[2]) == {"n1/0", "n1/1"}       # would delay it
    assert p.withheld(items[3]) == {"n1/0", "n1/1"}       # nobody knows
    # the controller's setting: nothing is backfilled onto reserved capacity
    assert plan(items, 10, gpus, SETTINGS).withheld(items[1]) == {"n1/0", "n1/1"}
    # a reserved GPU whose end is unknown: no expected start, no backfill either
    p = plan(items, 10, _slots({"n1": [None, float("nan")]}), ends_before)
    assert p.reservations[0].start is None and p.withheld(items[1]) == {"n1/0", "n1/1"}


def test_reservations_go_to_the_largest_waiting_and_never_share_a_gpu() -> None:
    gpus = _slots({"n1": [5.0] * 4, "n2": [6.0] * 4})
    two = QueueSettings(reserve_after=0, max_reservations=2)
    items = [Waiting("one", 0, gpus=1), Waiting("mig-small", 0, gpus=0.125), Waiting("four", 1, gpus=4),
             Waiting("three", 2, gpus=3)]
    p = plan(items, 10, gpus, two)
    assert [r.owner.key for r in p.reservations] == ["four", "three"]
    assert {r.node for r in p.reservations} == {"n1", "n2"}
    # below reserve_min (default 2 GPUs) nothing is reserved, however long it waits
    assert [r.owner.key for r in plan(items, 10, gpus, QueueSettings(0, 4)).reservations] == ["four", "three"]
    # "oldest": the policy's order (age, then key) decides, and reserve_min lower lets small work in
    oldest = plan(items, 10, gpus, QueueSettings(reserve_after=0, max_reservations=1, reserve_for="oldest",
                                                 reserve_min=0.1))
    assert [r.owner.key for r in oldest.reservations] == ["mig-small"]
    assert len(oldest.reservations[0].gpus) == 1


def test_an_item_larger_than_any_node_gets_no_reservation() -> None:
    assert plan([Waiting("huge", 0, gpus=16)], 100, _slots({"n1": [None] * 8}), SETTINGS).reservations == []


@pytest.mark.parametrize("kw, needle", [
    ({"reserve_after": -1}, "reserve-after -1"),
    ({"max_reservations": -2}, "max-reservations -2"),
    ({"backfill": "sometimes"}, "backfill 'sometimes': use one of none, ends-before"),
    ({"reserve_for": "biggest"}, "reserve-for 'biggest'"),
    ({"reserve_min": float("inf")}, "reserve-min-gpus inf"),
])
def test_bad_settings_name_the_setting_and_the_fix(kw: dict, needle: str) -> None:
    with pytest.raises(PolicyError, match=needle.replace("(", r"\(")):
        QueueSettings(**kw)


def test_duration_text() -> None:
    assert [duration_text(s) for s in (5, 119, 240, 7300)] == ["5s", "119s", "4m", "2h1m"]


# -- the allocator's unavailable set ------------------------------------------------------------------------
def _two_nodes() -> tuple[SliceIndex, dict]:
    idx = SliceIndex()
    for n in ("node-a", "node-b"):
        for s in node_slices(n, "H100-SXM5-80GB:2"):
            idx.upsert(s)
    return idx, {c["metadata"]["name"]: c for c in device_classes()}


def _gpu_claim(count: int = 1) -> dict:
    c = claim("c", [request(count=count)])
    for r in c["spec"]["devices"]["requests"]:
        r["exactly"]["tolerations"] = [C.managed_toleration()]
    return c


def test_unavailable_nodes_are_not_tried_and_unavailable_devices_not_used() -> None:
    slices, classes = _two_nodes()
    state = AllocatedState()
    alloc = Allocator(strategy="first-fit")
    nodes = [Node("node-a"), Node("node-b")]
    choice = alloc.allocate_on_nodes(nodes, [_gpu_claim()], slices, classes, state, unavailable={"node-a"})
    assert choice.node.name == "node-b"
    first = choice.results[0]["devices"]["results"][0]["device"]
    withheld = {DeviceID(C.DEFAULT_DRIVER_NAME, "node-a", first)}
    choice = alloc.allocate_on_nodes(nodes, [_gpu_claim()], slices, classes, state, unavailable=withheld)
    assert choice.node.name == "node-a" and choice.results[0]["devices"]["results"][0]["device"] != first
    # the caller's state is as before, and a miss under a withheld set is not remembered for the state alone
    assert state.devices == set() and state.pool_signature(C.DEFAULT_DRIVER_NAME, "node-a") == (0, 0)
    everything = {DeviceID(C.DEFAULT_DRIVER_NAME, p, d) for p in ("node-a",)
                  for d in [x.name for s in slices.slices() if s.pool == p for x in s.devices]}
    assert alloc.allocate_on_nodes([Node("node-a")], [_gpu_claim()], slices, classes, state,
                                   unavailable=everything).node is None
    assert alloc.allocate_on_nodes([Node("node-a")], [_gpu_claim()], slices, classes, state).node.name == "node-a"
    assert alloc.allocate(Node("node-a"), [_gpu_claim()], slices, classes, state, unavailable={"node-a"}) is None
