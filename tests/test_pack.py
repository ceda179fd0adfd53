"""The pack strategy on the driver's real slices (whole GPU, every MIG placement with counters, shared):
MIG packed onto one GPU with large placements kept free, shares packed by memory, modes kept together,
busy nodes first. First-fit keeps upstream's order."""

from __future__ import annotations

from collections import Counter

from controller.allocator import AllocatedState, Allocator, Node, SliceIndex
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from tests.support.cluster import node_slices

CLASSES = {c["metadata"]["name"]: c for c in device_classes()}
MANAGED = [C.managed_toleration()]


def _claim(name: str, cls: str, selector: str | None = None, memory: str | None = None) -> dict:
    exactly: dict = {"deviceClassName": cls, "tolerations": MANAGED}
    if selector:
        exactly["selectors"] = [{"cel": {"expression": selector}}]
    if memory:
        exactly["capacity"] = {"requests": {"memory": memory}}
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": [{"name": "r", "exactly": exactly}]}}}


def mig(name: str, profile: str) -> dict:
    return _claim(name, C.DEVICE_CLASS_MIG, f"device.attributes['gpu.partita.dev'].migProfile == '{profile}'")


def share(name: str, memory: str = "10Gi") -> dict:
    return _claim(name, C.DEVICE_CLASS_SHARED, memory=memory)


def whole(name: str) -> dict:
    return _claim(name, C.DEVICE_CLASS_GPU)


class Cluster:
    def __init__(self, strategy: str, **nodes: str):
        self.index = SliceIndex.from_slices([s for n, spec in nodes.items() for s in node_slices(n, spec)])
        self.nodes = [Node(n) for n in nodes]
        self.state = AllocatedState()
        self.allocator = Allocator(strategy=strategy)
        self.parent = {d.name: (d.parent, d.mig_placement) for s in self.index.slices() for d in s.devices}

    def add(self, claim: dict, nodes: list[str] | None = None) -> dict | None:
        choice = self.allocator.allocate_on_nodes([n for n in self.nodes if nodes is None or n.name in nodes],
                                                  [claim], self.index, CLASSES, self.state)
        if choice.node is None:
            return None
        [result] = choice.results
        self.state.add_allocation(result)
        [r] = result["devices"]["results"]
        return r

    def gpu_of(self, r: dict) -> str:
        return self.parent[r["device"]][0]


def test_seven_1g10gb_fill_one_h100_before_a_second_gpu_is_touched() -> None:
    cl = Cluster("pack", node="H100-SXM5-80GB:2")
    gpus = [cl.gpu_of(cl.add(mig(f"m{i}", "1g.10gb"))) for i in range(8)]
    assert len(set(gpus[:7])) == 1 and gpus[7] != gpus[0]


def test_small_mig_devices_keep_the_large_placements_free() -> None:
    cl = Cluster("pack", node="H100-SXM5-80GB:2")
    small = [cl.add(mig(f"m{i}", "1g.10gb")) for i in range(3)]
    gpu = cl.gpu_of(small[0])
    assert {cl.gpu_of(r) for r in small} == {gpu}
    big = cl.add(mig("big", "4g.40gb"))      # still fits beside the three small ones
    assert cl.gpu_of(big) == gpu
    assert sorted(cl.parent[r["device"]][1] for r in small) == [4, 5, 6]
    # upstream order takes the lowest placements, which blocks the only 4g.40gb placement on that GPU
    ff = Cluster("first-fit", node="H100-SXM5-80GB:2")
    ff_small = [ff.add(mig(f"m{i}", "1g.10gb")) for i in range(3)]
    assert sorted(ff.parent[r["device"]][1] for r in ff_small) == [0, 1, 2]
    assert ff.gpu_of(ff.add(mig("big", "4g.40gb"))) != ff.gpu_of(ff_small[0])


def test_a_3g_takes_the_placement_that_keeps_the_4g_free() -> None:
    cl = Cluster("pack", node="H100-SXM5-80GB:2")
    three, four = cl.add(mig("m3", "3g.40gb")), cl.add(mig("m4", "4g.40gb"))
    assert cl.gpu_of(three) == cl.gpu_of(four)
    assert (cl.parent[three["device"]][1], cl.parent[four["device"]][1]) == (4, 0)
    ff = Cluster("first-fit", node="H100-SXM5-80GB:2")
    three, four = ff.add(mig("m3", "3g.40gb")), ff.add(mig("m4", "4g.40gb"))
    assert ff.parent[three["device"]][1] == 0 and ff.gpu_of(three) != ff.gpu_of(four)


def test_mixed_small_profiles_share_one_gpu_and_a_7g_still_fits() -> None:
    cl = Cluster("pack", node="H100-SXM5-80GB:2")
    small = [cl.add(mig(f"m{i}", p)) for i, p in enumerate(["1g.10gb", "2g.20gb", "1g.10gb", "1g.20gb"])]
    assert len({cl.gpu_of(r) for r in small}) == 1
    seven = cl.add(mig("m7", "7g.80gb"))
    assert seven is not None and cl.gpu_of(seven) != cl.gpu_of(small[0])
    assert cl.add(whole("w")) is None            # both GPUs are in MIG use now: nothing whole is left


def test_eight_10gi_shares_fill_an_80gb_gpu_and_the_ninth_opens_another() -> None:
    cl = Cluster("pack", node="A100-SXM4-80GB:2")
    [capacity] = {c.value for s in cl.index.slices() for d in s.devices if d.allow_multiple for _, c, _ in d.capacity}
    assert capacity == 80 * 1024**3                     # 81920Mi: exactly eight 10Gi shares
    devices = [cl.add(share(f"s{i}"))["device"] for i in range(9)]
    assert sorted(Counter(devices).values()) == [1, 8]
    assert len(set(devices[:8])) == 1


def test_modes_stay_together() -> None:
    cl = Cluster("pack", node="H100-SXM5-80GB:3")
    m1 = cl.gpu_of(cl.add(mig("m1", "1g.10gb")))
    s1 = cl.gpu_of(cl.add(share("s1")))
    assert s1 != m1
    assert cl.gpu_of(cl.add(mig("m2", "2g.20gb"))) == m1      # MIG with MIG
    assert cl.gpu_of(cl.add(share("s2"))) == s1               # shares with shares
    w = cl.gpu_of(cl.add(whole("w")))
    assert w not in (m1, s1)                                  # the whole GPU is the untouched one


def test_busy_nodes_first_and_first_fit_keeps_node_order() -> None:
    cl = Cluster("pack", **{"node-a": "H100-SXM5-80GB:8", "node-b": "H100-SXM5-80GB:8"})
    assert cl.add(whole("w0"), nodes=["node-b"])["pool"] == "node-b"
    assert [cl.add(whole(f"w{i}"))["pool"] for i in range(1, 4)] == ["node-b"] * 3
    ff = Cluster("first-fit", **{"node-a": "H100-SXM5-80GB:8", "node-b": "H100-SXM5-80GB:8"})
    assert ff.add(whole("w0"), nodes=["node-b"])["pool"] == "node-b"
    first = ff.add(whole("w1"))
    assert first["pool"] == "node-a"
    # and within a node, upstream's device order: slices by name, devices in slice order
    in_order = [d.name for sl in sorted(ff.index.slices(), key=lambda x: x.name) if sl.pool == "node-a"
                for d in sl.devices if d.type == "gpu"]
    assert [first["device"], *(ff.add(whole(f"x{i}"))["device"] for i in range(7))] == in_order
