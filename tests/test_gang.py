"""Gangs (controller/operator/gang.py, docs/gangs.md): a 4-pod gang starts whole or not at all, never
holding GPUs while partial; one node is preferred, and required with gang-topology: node."""

from __future__ import annotations

import asyncio

import pytest

from controller.operator.gang import GANG, GANG_SIZE, GANG_TOPOLOGY, JOB_NAME, GangError, gang_of, \
    workload_gang_size
from tests.support.cluster import claim, is_allocated, pod, request, run

pytestmark = pytest.mark.timeout(90)

_allocated = is_allocated


def _node(cl, name: str) -> str:
    return cl.claim(name)["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"][0]["matchFields"][0]["values"][0]


def member(name: str, gang: str = "train", size: int = 4, count: int = 1, **annotations: str) -> tuple[dict, dict]:
    p = pod(name, [name])
    p["metadata"]["annotations"] = {GANG: gang, GANG_SIZE: str(size), **annotations}
    return p, claim(name, [request(count=count)])


def test_a_4_pod_gang_starts_whole_or_not_at_all() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:4")
        cl.submit(pod("other", ["other"]), claim("other", [request(count=2)]))
        await cl.allocated("other")
        names = [f"g{i}" for i in range(4)]
        for n in names[:3]:
            cl.submit(*member(n))
        waiting = "gang default/train: 3 of 4 pods exist; nothing is allocated until all 4 do"
        await cl.server.wait_for(lambda _: any(m == waiting for _, _, m in cl.events("PartitaGangWaiting")) or None)
        assert not any(_allocated(cl, n) for n in names[:3]), cl.events()
        cl.submit(*member(names[3]))
        # all four exist, two GPUs are free: none of them gets any
        _, _, why = await cl.event("PartitaUnschedulable")
        assert why.startswith("gang default/train: pod default/g2 does not fit beside the 2 member(s) placed before it")
        await asyncio.sleep(0.6)
        assert not any(_allocated(cl, n) for n in names)
        assert not cl.controller.cache.inflight
        # the other pod ends: the whole gang gets its GPUs at once, on the one node
        cl.server.delete("pods", "other", "default")
        for n in names:
            await cl.allocated(n)
        assert {_node(cl, n) for n in names} == {"node-a"}
        devices = {cl.claim(n)["status"]["allocation"]["devices"]["results"][0]["device"] for n in names}
        assert len(devices) == 4
        done = "gang default/train: allocated all 4 pods on node-a"
        await cl.server.wait_for(lambda _: any(m == done for _, _, m in cl.events("PartitaAllocated")) or None)
    run(scenario)


def test_a_gang_prefers_one_node_and_requires_it_with_gang_topology_node() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.add_node("node-b", "H100-SXM5-80GB:2")
        # one node has room for both: both go there
        for n in ("p0", "p1"):
            cl.submit(*member(n, gang="pair", size=2))
        await cl.allocated("p0")
        await cl.allocated("p1")
        assert _node(cl, "p0") == _node(cl, "p1")
        full = _node(cl, "p0")
        cl.server.delete("pods", "p0", "default")
        await cl.server.wait_for(lambda _: not _allocated(cl, "p0") or None)
        # now one GPU is free on each node: a required same-node gang waits, a preferring one spreads
        for n in ("r0", "r1"):
            cl.submit(*member(n, gang="strict", size=2, **{GANG_TOPOLOGY: "node"}))
        _, _, why = await cl.event("PartitaUnschedulable")
        assert "gang default/strict" in why and "(gang-topology node)" in why
        assert not _allocated(cl, "r0") and not _allocated(cl, "r1")
        cl.server.delete("pods", "r0", "default")
        cl.server.delete("pods", "r1", "default")
        for n in ("s0", "s1"):
            cl.submit(*member(n, gang="spread", size=2))
        await cl.allocated("s0")
        await cl.allocated("s1")
        assert {_node(cl, "s0"), _node(cl, "s1")} == {"node-a", "node-b"}
        assert full in {"node-a", "node-b"}
    run(scenario)


def test_bad_gang_annotations_get_an_event_naming_the_fix() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(*member("bad", size="four"))  # type: ignore[arg-type]
        _, _, message = await cl.event("PartitaInvalidGang")
        assert message == ("pod default/bad: annotation partita.dev/gang-size='four' must be a whole number of pods "
                           "from 1 to 1024")
        assert not _allocated(cl, "bad")
    run(scenario)


def _pod(annotations: dict | None = None, labels: dict | None = None, spec: dict | None = None) -> dict:
    return {"metadata": {"name": "w-0", "namespace": "ml", "annotations": annotations or {}, "labels": labels or {}},
            "spec": spec or {}}


def test_gang_membership_from_annotations_a_jobs_label_and_the_workload_api() -> None:
    assert gang_of(_pod()) is None
    g = gang_of(_pod({GANG: "t", GANG_SIZE: "4"}))
    assert (g.key, g.size, g.same_node) == ("ml/t", 4, False)
    # a Job's pods: the Job is the gang
    g = gang_of(_pod({GANG_SIZE: "3", GANG_TOPOLOGY: "node"}, {JOB_NAME: "train"}))
    assert (g.key, g.size, g.same_node) == ("ml/job/train", 3, True)
    # the Workload API (1.35 scheduling.k8s.io/v1alpha1): the size is the pod group's gang minCount
    g = gang_of(_pod(spec={"workloadRef": {"name": "wl", "podGroup": "workers", "podGroupReplicaKey": "1"}}))
    assert (g.key, g.size, g.workload, g.pod_group) == ("ml/workload/wl/workers/1", None, "wl", "workers")
    workload = {"spec": {"podGroups": [{"name": "driver", "policy": {"basic": {}}},
                                       {"name": "workers", "policy": {"gang": {"minCount": 4}}}]}}
    assert workload_gang_size(workload, g) == 4
    assert workload_gang_size(workload, gang_of(_pod(spec={"workloadRef": {"name": "wl", "podGroup": "driver"}}))) is None
    with pytest.raises(GangError, match="Workload ml/wl has no pod group 'ps'"):
        workload_gang_size(workload, gang_of(_pod(spec={"workloadRef": {"name": "wl", "podGroup": "ps"}})))


@pytest.mark.parametrize("annotations, needle", [
    ({GANG: "t"}, "partita.dev/gang-size is missing"),
    ({GANG_SIZE: "2"}, "without partita.dev/gang: name the gang"),
    ({GANG: "t", GANG_SIZE: "0"}, "gang-size='0' must be a whole number"),
    ({GANG: "t", GANG_SIZE: "2", GANG_TOPOLOGY: "rack"}, "gang-topology='rack' is not a topology"),
])
def test_bad_gang_annotations_name_the_pod_the_annotation_and_the_fix(annotations: dict, needle: str) -> None:
    with pytest.raises(GangError, match="pod ml/w-0: .*" + needle.replace("(", r"\(")):
        gang_of(_pod(annotations))
