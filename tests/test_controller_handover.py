"""The controller never gives one device to two claims: leadership fences every write, nothing is decided
before every watch has listed, a re-list after 410 converges (deletes in the gap are handled), and the
allocated state counts holders per device."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from controller.allocator.types import DeviceID
from controller.operator.cache import Cache
from controller.operator.controller import Controller, ControllerConfig
from controller.operator.informer import Informer, Watched
from controller.operator.leader import LeaderElector, NotLeader
from controller.operator.writer import ANNOTATION_NODE, ANNOTATION_POD, write_allocation
from controller.sandbox.apiserver import ApiServer
from controller.sandbox.threads import ControllerThread
from driver.api import constants as C
from driver.api.kube import Kube
from tests.support.cluster import Cluster, claim, cluster, pod, request

pytestmark = pytest.mark.timeout(60)

FAST = dict(retry_min=0.1, retry_max=1.0, report_after=0.3)
DRIVER = C.DEFAULT_DRIVER_NAME


def whole(device: str, pool: str = "node-a") -> dict:
    return {"devices": {"results": [{"request": "gpu", "driver": DRIVER, "pool": pool, "device": device}]},
            "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [pool]}]}]}}


def allocated(c: dict | None) -> bool:
    return bool(c and (c.get("status") or {}).get("allocation"))


# -- allocated state: holders per device ------------------------------------------------------------------
def claim_obj(name: str, uid: str, rv: int, allocation: dict | None) -> dict:
    obj = {"metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": str(rv)},
           "spec": {}, "status": {}}
    if allocation:
        obj["status"]["allocation"] = allocation
    return obj


def test_releasing_one_of_two_holders_keeps_the_device_allocated(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(DRIVER)
    gpu = DeviceID(DRIVER, "node-a", "gpu-0")
    cache.apply("claim", "ADDED", claim_obj("a", "uid-a", 1, whole("gpu-0")))
    with caplog.at_level(logging.ERROR):
        cache.apply("claim", "ADDED", claim_obj("b", "uid-b", 2, whole("gpu-0")))
    assert "DOUBLE ALLOCATION" in caplog.text and "default/a" in caplog.text and "default/b" in caplog.text
    assert cache.holders.holders(gpu) == ["default/a", "default/b"]
    cache.apply("claim", "DELETED", claim_obj("a", "uid-a", 3, whole("gpu-0")))
    assert cache.allocated.is_allocated(gpu), "b still holds the GPU: it must not be free for a third claim"
    cache.apply("claim", "MODIFIED", claim_obj("b", "uid-b", 4, None))
    assert not cache.allocated.is_allocated(gpu)
    assert cache.holders.double_held() == {}


def test_two_shares_with_one_share_id_are_counted_per_holder() -> None:
    cache = Cache(DRIVER)
    dev = DeviceID(DRIVER, "node-a", "gpu-0-shared")
    share = whole("gpu-0-shared")
    share["devices"]["results"][0].update(shareID="s-1", consumedCapacity={"memory": "10Gi"})
    cache.apply("claim", "ADDED", claim_obj("a", "uid-a", 1, share))
    cache.apply("claim", "ADDED", claim_obj("b", "uid-b", 2, share))
    cache.apply("claim", "DELETED", claim_obj("a", "uid-a", 3, share))
    assert (dev, "s-1") in cache.allocated.shares
    cache.apply("claim", "DELETED", claim_obj("b", "uid-b", 4, share))
    assert (dev, "s-1") not in cache.allocated.shares and dev not in cache.allocated.capacity


def test_a_write_whose_watch_events_came_first_is_not_kept_in_flight() -> None:
    """The watch can deliver our allocation write, and kube-scheduler clearing it, before the worker handles the
    write's own response. Recording the write then must not put the claim back in flight: no later event would
    end the entry, and the worker would skip the pod (its claim "in flight") for a minute, where it should move
    it to another node at once (this made test_allocation_cleared_by_kube_scheduler_moves_to_another_node fail
    about one run in six)."""
    cache = Cache(DRIVER)
    cache.apply("claim", "ADDED", claim_obj("c", "uid-c", 1, None))
    written = claim_obj("c", "uid-c", 2, whole("gpu-0"))
    cache.apply("claim", "MODIFIED", written)                  # the watch shows our write ...
    cache.apply("claim", "MODIFIED", claim_obj("c", "uid-c", 3, None))    # ... and its clearing
    cache.record_write(written, whole("gpu-0"), 2, "node-a", "default/p")  # then the write's response
    assert "uid-c" not in cache.inflight
    assert not cache.allocated.is_allocated(DeviceID(DRIVER, "node-a", "gpu-0"))
    # the usual order still keeps the write in flight until the watch shows it
    cache.apply("claim", "ADDED", claim_obj("d", "uid-d", 4, None))
    cache.record_write(claim_obj("d", "uid-d", 5, whole("gpu-1")), whole("gpu-1"), 5, "node-a", "default/q")
    assert "uid-d" in cache.inflight and cache.allocated.is_allocated(DeviceID(DRIVER, "node-a", "gpu-1"))


# -- informer: a list replaces the cache -------------------------------------------------------------------
def test_a_relist_reports_objects_missing_from_it_as_deleted_and_recreated_ones_as_new() -> None:
    seen: list[tuple[str, str, str]] = []
    inf = Informer(None, Watched("pod", "", "v1", "pods"),  # type: ignore[arg-type]
                   lambda kind, etype, obj: seen.append((etype, obj["metadata"]["name"], obj["metadata"]["uid"])))

    def p(name: str, uid: str, rv: int) -> dict:
        return {"metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": str(rv)}}

    inf.replace([p("a", "1", 1), p("b", "2", 2), p("c", "3", 3)])
    assert inf.synced and sorted(seen) == [("ADDED", "a", "1"), ("ADDED", "b", "2"), ("ADDED", "c", "3")]
    seen.clear()
    inf.replace([p("a", "1", 1), p("c", "9", 7), p("d", "4", 8)])    # b gone; c recreated; d new; a unchanged
    assert seen == [("DELETED", "b", "2"), ("DELETED", "c", "3"), ("ADDED", "c", "9"), ("ADDED", "d", "4")]
    assert set(inf.known) == {("default", "a"), ("default", "c"), ("default", "d")}


def test_informer_resync_must_be_positive() -> None:
    with pytest.raises(ValueError, match="resync"):
        Informer(None, Watched("pod", "", "v1", "pods"), lambda *_: None, resync=0)  # type: ignore[arg-type]


def test_a_pod_deleted_while_the_watch_was_down_past_410_has_its_claim_released() -> None:
    async def main() -> None:
        async with cluster(ControllerConfig(**FAST)) as cl:
            cl.add_node("node-a", "H100-SXM5-80GB:1")
            cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
            await cl.allocated("c1")
            informer = cl.controller.informers.by_kind("pod")
            lists = informer.lists
            # No await between these: the controller cannot reconnect in between. The watch is cut, the
            # pod deleted in the gap, and the log compacted, so the resume gets 410 and must list again.
            assert cl.server.drop_watches("pods") >= 1
            cl.server.delete("pods", "p1", "default")
            cl.server.compact("pods")
            await cl.server.wait_for(lambda s: not allocated(cl.claim("c1")), timeout=5)
            assert informer.lists > lists
            # and the GPU is free for the next pod
            cl.submit(pod("p2", ["c2"]), claim("c2", [request()]))
            await cl.allocated("c2", timeout=5)
    asyncio.run(main())


def test_the_periodic_resync_lists_again() -> None:
    async def main() -> None:
        async with cluster(ControllerConfig(**FAST, resync_seconds=0.5)) as cl:
            informer = cl.controller.informers.by_kind("claim")
            await cl.server.wait_for(lambda s: informer.lists >= 3, timeout=10)
    asyncio.run(main())


# -- nothing is decided before every watch has listed -----------------------------------------------------
def test_nothing_is_released_or_allocated_before_every_watch_has_listed() -> None:
    """A claim held by a running pod: if the controller acted on the claims' list before the pods' list
    was in, it would see no consumer, release the claim and give its GPU to the pending pod."""
    from tests.support.cluster import node, node_slices

    async def main() -> None:
        server = ApiServer(bookmark_interval=0.5)
        await server.start()
        from driver.api.deviceclasses import device_classes
        for c in device_classes():
            server.create(c)
        n = server.create(node("node-a"))
        slices = node_slices("node-a", "H100-SXM5-80GB:1", uid=n["metadata"]["uid"])
        for s in slices:
            server.create(s)
        gpu = next(d["name"] for s in slices for d in s["spec"].get("devices") or []
                   if (d.get("attributes") or {}).get("type") == {"string": "gpu"})
        held = claim("held", [request()])
        held["metadata"].update(finalizers=[C.CLAIM_FINALIZER],
                                annotations={ANNOTATION_POD: "default/runner", ANNOTATION_NODE: "node-a"})
        alloc = whole(gpu)
        alloc["devices"]["results"][0]["tolerations"] = [C.managed_toleration()]
        alloc["allocationTimestamp"] = "2026-01-01T00:00:00Z"
        held["status"] = {"allocation": alloc}
        server.create(held)
        runner = pod("runner", ["held"], nodeName="node-a")
        runner["status"] = {"phase": "Running"}
        server.create(runner)
        server.create(claim("wants", [request()]))
        server.create(pod("waiting", ["wants"]))
        server.inject_fault("pods", "list", 0, count=1, delay=2.0)      # the pods' first list is slow
        running: list = []
        ctl = ControllerThread(ControllerConfig(**FAST), server.url, running)
        try:
            ctl.start(wait=False)
            await server.wait_for(lambda s: running and running[-1].controller.synced, timeout=15)
            cl = Cluster(server, running)
            await asyncio.sleep(1.0)                                       # absence check: time to act wrongly
            assert allocated(cl.claim("held")), "a claim in use was released"
            assert not allocated(cl.claim("wants")), "the held GPU was given to a second claim"
        finally:
            await asyncio.get_running_loop().run_in_executor(None, ctl.stop)
            await server.stop()
    asyncio.run(main())


# -- the leader fence ---------------------------------------------------------------------------------------
async def _elected(server: ApiServer, clock) -> tuple[Kube, LeaderElector]:  # noqa: ANN001
    kube = await Kube.connect(server.url)
    el = LeaderElector(kube, "default", "partita-controller", identity="old-leader", lease_seconds=15,
                       renew_deadline=10, retry_seconds=2, clock=clock)
    assert await el.acquire(asyncio.Event())
    return kube, el


def test_a_leader_past_its_renew_deadline_writes_nothing() -> None:
    """A paused (SIGSTOP) leader resumes: its last renew is older than the renew deadline, so the
    allocation it was about to write is not sent."""
    async def main() -> None:
        server = ApiServer()
        await server.start()
        now = [100.0]
        kube, el = await _elected(server, lambda: now[0])
        try:
            cached = server.create(claim("c1", [request()]))
            now[0] += 10.5                                   # asleep for longer than the renew deadline
            with pytest.raises(NotLeader, match="no unexpired lease"):
                await write_allocation(kube, cached, whole("gpu-0"), "default/p1", "node-a", el)
            stored = server.get("resourceclaims", "c1", "default", group="resource.k8s.io")
            assert stored["metadata"]["resourceVersion"] == cached["metadata"]["resourceVersion"]
            assert el.lost.is_set() and not el.holds()
            now[0] -= 10.5                                   # loss is final, even if the clock looked fine
            with pytest.raises(NotLeader):
                el.check("anything")
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_a_write_racing_a_lease_taken_over_does_not_land() -> None:
    """Within its deadline by its own clock, but the Lease names another holder: the allocation is not
    written (the Lease is re-read right before it)."""
    async def main() -> None:
        server = ApiServer()
        await server.start()
        kube, el = await _elected(server, lambda: 100.0)
        try:
            cached = server.create(claim("c1", [request()]))
            lease = server.get("leases", "partita-controller", "default")
            lease["spec"].update(holderIdentity="new-leader", leaseTransitions=lease["spec"]["leaseTransitions"] + 1)
            server.update(lease)
            with pytest.raises(NotLeader, match="no longer ours"):
                await write_allocation(kube, cached, whole("gpu-0"), "default/p1", "node-a", el)
            assert not allocated(server.get("resourceclaims", "c1", "default", group="resource.k8s.io"))
            assert el.lost.is_set()
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_an_allocation_based_on_a_stale_cache_gets_a_conflict() -> None:
    async def main() -> None:
        server = ApiServer()
        await server.start()
        kube = await Kube.connect(server.url)
        try:
            cached = server.create(claim("c1", [request()]))
            fresh = server.get("resourceclaims", "c1", "default", group="resource.k8s.io")
            fresh["metadata"]["labels"] = {"changed": "meanwhile"}
            server.update(fresh)
            from driver.api.kube import KubeError
            with pytest.raises(KubeError) as e:
                await write_allocation(kube, cached, whole("gpu-0"), "default/p1", "node-a")
            assert e.value.conflict
            assert not allocated(server.get("resourceclaims", "c1", "default", group="resource.k8s.io"))
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_the_worker_stops_at_once_when_the_fence_refuses() -> None:
    class Refusing:
        calls = 0

        def check(self, what: str) -> None:
            Refusing.calls += 1
            raise NotLeader(f"not writing {what}")

        async def confirm(self, what: str) -> None:
            self.check(what)

    async def main() -> None:
        ctl = Controller(ControllerConfig(), kube=None)  # type: ignore[arg-type]
        ctl.fence = Refusing()
        ctl.informers = SimpleNamespace(synced=True)
        for i in range(5):
            ctl.enqueue(f"pod:default/p{i}")
        await asyncio.wait_for(ctl.run(asyncio.Event()), 5)
        assert ctl.lost and Refusing.calls == 1
    asyncio.run(main())


def test_leader_timings_must_nest() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderElector(None, "default", "x", lease_seconds=10, renew_deadline=10, retry_seconds=2)  # type: ignore[arg-type]


def test_a_standby_judges_expiry_by_its_own_clock_not_the_holders_renew_time() -> None:
    """The holder's renewTime may be far in the past by a skewed wall clock: a standby waits a full lease
    duration after it last saw the lease change before taking it."""
    async def main() -> None:
        server = ApiServer()
        await server.start()
        now = [0.0]
        server.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "partita-controller", "namespace": "default"},
                       "spec": {"holderIdentity": "someone", "leaseDurationSeconds": 15, "leaseTransitions": 3,
                                "renewTime": "2020-01-01T00:00:00.000000Z"}})
        kube = await Kube.connect(server.url)
        el = LeaderElector(kube, "default", "partita-controller", identity="standby", lease_seconds=15,
                           renew_deadline=10, retry_seconds=2, clock=lambda: now[0])
        try:
            assert not await el._try()          # noqa: SLF001 - first sight: held
            now[0] = 14.0
            assert not await el._try()          # noqa: SLF001
            now[0] = 15.5
            assert await el._try()              # noqa: SLF001 - unchanged for a lease duration: expired
            lease = server.get("leases", "partita-controller", "default")
            assert lease["spec"]["holderIdentity"] == "standby" and lease["spec"]["leaseTransitions"] == 4
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())
