"""The allocator's index of nodes known to be full for a kind of claim (controller/allocator/nodeindex.py):
it never hides a node that fits — the same decisions as trying every node every time, over random streams
of allocations, releases and slice changes — and it forgets a node when what the node holds, its slices,
its labels or a pool any node may use change."""

from __future__ import annotations

import copy
import random

import pytest

from controller.allocator import AllocatedState, Allocator, Node, SliceIndex
from controller.allocator.strategies import Pack
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from tests.support.allocstream import make_claim
from tests.support.cluster import node_slices

CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
TOLERATE = [C.managed_toleration()]


def _strip(results: list[dict] | None) -> list[dict] | None:
    """Results without shareIDs (random per allocation)."""
    if results is None:
        return None
    out = copy.deepcopy(results)
    for r in out:
        for d in r["devices"]["results"]:
            d.pop("shareID", None)
    return out


def _whole(name: str, node_label: str | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {
                "deviceClassName": C.DEVICE_CLASS_GPU, "count": 1, "tolerations": TOLERATE}}]}}}


def _cluster(specs: dict[str, str]) -> tuple[list[dict], list[Node]]:
    slices = [s for n, spec in specs.items() for s in node_slices(n, spec)]
    for i, s in enumerate(slices):
        s["metadata"]["resourceVersion"] = str(i + 1)
    return slices, [Node(n, {"kubernetes.io/hostname": n}) for n in specs]


@pytest.mark.parametrize("strategy", ["pack", "first-fit"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_index_makes_the_same_decisions_as_trying_every_node(strategy: str, seed: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if seed == 3:      # a journal that overflows often: the index must start over, not miss changes
        monkeypatch.setattr(AllocatedState, "JOURNAL_LIMIT", 3)
    rng = random.Random(seed)
    slices, nodes = _cluster({"n1": "H100-SXM5-80GB:2", "n2": "A100-SXM4-80GB:1", "n3": "H100-SXM5-80GB:1",
                              "n4": "L4:2"})
    index = SliceIndex.from_slices(slices)
    indexed, reference = Allocator(strategy=strategy), Allocator(strategy=strategy, node_index=False)
    state = AllocatedState()
    live: list[dict] = []
    withheld: list[dict] = []
    version = 1000
    decisions = unsatisfiable = skipped_work = 0
    pack = Pack()          # its devices-per-node count, kept up to date from the journal, against a fresh count
    for step in range(400):
        assert pack.order_nodes(nodes, index, state) == Pack().order_nodes(nodes, index, state), f"step {step}"
        r = rng.random()
        if r < 0.25 and live:
            state.remove_allocation(live.pop(rng.randrange(len(live))))
            continue
        if r < 0.30:
            # a slice change: withdraw one of a node's slices (its pool becomes incomplete) or put it back
            version += 1
            if withheld and rng.random() < 0.6:
                s = withheld.pop()
                s["metadata"]["resourceVersion"] = str(version)
                index.upsert(s)
            else:
                s = copy.deepcopy(rng.choice(slices))
                if s["metadata"]["name"] not in {w["metadata"]["name"] for w in withheld}:
                    index.delete(s["metadata"]["name"])
                    withheld.append(s)
            continue
        if r < 0.33:
            # the same node with other labels (a new Node object, as the operator makes one per call)
            i = rng.randrange(len(nodes))
            nodes[i] = Node(nodes[i].name, {**nodes[i].labels, "step": str(step % 3)})
            continue
        kind = rng.choice(("whole", "whole", "mig", "shared", "pair"))
        arg = {"whole": lambda: rng.choice(("any", "h100", "big", "l4")),
               "mig": lambda: rng.choice(("1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb")),
               "shared": lambda: rng.choice((10, 20, 40)), "pair": lambda: None}[kind]()
        claim, _ = make_claim(kind, arg)
        want = reference.allocate_on_nodes(nodes, [claim], index, CLASSES, state)
        got = indexed.allocate_on_nodes(nodes, [claim], index, CLASSES, state)
        where = f"step {step}: {kind} {arg}"
        assert (got.node and got.node.name) == (want.node and want.node.name), where
        assert _strip(got.results) == _strip(want.results), where
        assert got.unsatisfiable_reasons == want.unsatisfiable_reasons, where
        decisions += 1
        skipped_work += len(indexed._full)     # noqa: SLF001 - the index is in use, not idle
        if got.node is None:
            unsatisfiable += 1
            continue
        live.append(got.results[0])
        state.add_allocation(got.results[0])
    assert decisions > 200 and unsatisfiable > 20, (decisions, unsatisfiable)
    assert skipped_work > 0


def _fill(allocator: Allocator, nodes: list[Node], index: SliceIndex, state: AllocatedState) -> list[dict]:
    placed = []
    for i in range(100):
        choice = allocator.allocate_on_nodes(nodes, [_whole(f"c{i}")], index, CLASSES, state)
        if choice.node is None:
            return placed
        state.add_allocation(choice.results[0])
        placed.append(choice.results[0])
    raise AssertionError("the cluster never filled")


@pytest.mark.parametrize("strategy", ["pack", "first-fit"])
def test_a_release_makes_its_node_a_candidate_again(strategy: str) -> None:
    slices, nodes = _cluster({"a": "H100-SXM5-80GB:2", "b": "H100-SXM5-80GB:2"})
    index, state, allocator = SliceIndex.from_slices(slices), AllocatedState(), Allocator(strategy=strategy)
    placed = _fill(allocator, nodes, index, state)
    assert len(placed) == 4
    assert allocator.allocate_on_nodes(nodes, [_whole("x")], index, CLASSES, state).node is None   # both known full
    freed = next(p for p in placed if p["devices"]["results"][0]["pool"] == "b")
    state.remove_allocation(freed)
    choice = allocator.allocate_on_nodes(nodes, [_whole("y")], index, CLASSES, state)
    assert choice.node is not None and choice.node.name == "b"
    assert choice.results[0]["devices"]["results"][0]["device"] == freed["devices"]["results"][0]["device"]


def test_a_slice_change_makes_its_node_a_candidate_again() -> None:
    slices, nodes = _cluster({"a": "H100-SXM5-80GB:1"})
    index, state, allocator = SliceIndex.from_slices(slices), AllocatedState(), Allocator(strategy="pack")
    assert len(_fill(allocator, nodes, index, state)) == 1
    for s in slices:                                   # the node now publishes two GPUs
        index.delete(s["metadata"]["name"])
    for s in node_slices("a", "H100-SXM5-80GB:2"):
        s["metadata"]["resourceVersion"] = "99"
        index.upsert(s)
    choice = allocator.allocate_on_nodes(nodes, [_whole("y")], index, CLASSES, state)
    assert choice.node is not None and choice.node.name == "a"


def test_new_labels_make_a_node_a_candidate_again() -> None:
    """A slice selecting nodes by label: the node fits once it has the label."""
    device = {"name": "dev0", "attributes": {"type": {"string": "gpu"}}}
    net = {"metadata": {"name": "net-0", "resourceVersion": "1"},
           "spec": {"driver": "net.example.com", "pool": {"name": "net", "generation": 1, "resourceSliceCount": 1},
                    "nodeSelector": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "zone", "operator": "In", "values": ["a"]}]}]},
                    "devices": [device]}}
    classes = {"any": {"metadata": {"name": "any"}, "spec": {}}}
    claim = {"metadata": {"name": "c", "namespace": "default"},
             "spec": {"devices": {"requests": [{"name": "r", "exactly": {"deviceClassName": "any", "count": 1}}]}}}
    index, state, allocator = SliceIndex.from_slices([net]), AllocatedState(), Allocator(strategy="pack")
    assert allocator.allocate_on_nodes([Node("x", {"zone": "b"})], [claim], index, classes, state).node is None
    choice = allocator.allocate_on_nodes([Node("x", {"zone": "a"})], [claim], index, classes, state)
    assert choice.node is not None and choice.node.name == "x"


def test_a_release_in_a_pool_any_node_may_use_makes_every_node_a_candidate_again() -> None:
    """Network-attached devices (a slice with allNodes, no nodeName): releasing one frees it for every node."""
    net = {"metadata": {"name": "net-0", "resourceVersion": "1"},
           "spec": {"driver": "net.example.com", "pool": {"name": "net", "generation": 1, "resourceSliceCount": 1},
                    "allNodes": True, "devices": [{"name": "dev0", "attributes": {"type": {"string": "nic"}}}]}}
    classes = {"any": {"metadata": {"name": "any"}, "spec": {}}}

    def claim(name: str) -> dict:
        return {"metadata": {"name": name, "namespace": "default"},
                "spec": {"devices": {"requests": [{"name": "r", "exactly": {"deviceClassName": "any", "count": 1}}]}}}

    nodes = [Node("x"), Node("y")]
    index, state, allocator = SliceIndex.from_slices([net]), AllocatedState(), Allocator(strategy="first-fit")
    first = allocator.allocate_on_nodes(nodes, [claim("a")], index, classes, state)
    assert first.node is not None
    state.add_allocation(first.results[0])
    assert allocator.allocate_on_nodes(nodes, [claim("b")], index, classes, state).node is None
    state.remove_allocation(first.results[0])
    again = allocator.allocate_on_nodes(nodes, [claim("c")], index, classes, state)
    assert again.node is not None and again.node.name == "x"


def test_another_allocated_state_starts_the_index_over() -> None:
    slices, nodes = _cluster({"a": "H100-SXM5-80GB:1"})
    index, allocator = SliceIndex.from_slices(slices), Allocator(strategy="pack")
    full = AllocatedState()
    assert len(_fill(allocator, nodes, index, full)) == 1
    assert allocator.allocate_on_nodes(nodes, [_whole("x")], index, CLASSES, full).node is None
    choice = allocator.allocate_on_nodes(nodes, [_whole("y")], index, CLASSES, AllocatedState())
    assert choice.node is not None and choice.node.name == "a"
