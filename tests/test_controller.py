"""The controller, run for real (kopf, watches, writes) against the API emulator."""

from __future__ import annotations

import asyncio

import pytest

from controller.operator.controller import ControllerConfig
from controller.operator.writer import ANNOTATION_NODE, ANNOTATION_POD
from driver.api import constants as C
from driver.slices import SliceFeatures
from tests.support.cluster import claim, cluster, pod, request

pytestmark = pytest.mark.timeout(60)

FAST = dict(retry_min=0.1, retry_max=1.0, report_after=0.3)


def run(scenario, **cfg):
    async def main():
        async with cluster(ControllerConfig(**{**FAST, **cfg})) as cl:
            await scenario(cl)
    asyncio.run(main())


def node_of(c: dict) -> str:
    return c["status"]["allocation"]["nodeSelector"]["nodeSelectorTerms"][0]["matchFields"][0]["values"][0]


def devices_of(c: dict) -> list[str]:
    return [r["device"] for r in c["status"]["allocation"]["devices"]["results"]]


async def settle(cl, seconds: float = 0.6) -> None:
    """Give the controller time to act on something it must NOT do (absence checks only)."""
    await asyncio.sleep(seconds)


def test_allocation_has_everything_kube_scheduler_writes() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        c = await cl.allocated("c1")
        alloc = c["status"]["allocation"]
        assert alloc["nodeSelector"] == {"nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["node-a"]}]}]}
        assert alloc["allocationTimestamp"].endswith("Z")
        [result] = alloc["devices"]["results"]
        assert result["driver"] == C.DEFAULT_DRIVER_NAME and result["pool"] == "node-a"
        assert result["request"] == "gpu" and result["device"].startswith("gpu-")
        # the managed taint is tolerated in the result, as the scheduler records tolerations it used
        assert result["tolerations"] == [C.managed_toleration()]
        assert C.CLAIM_FINALIZER in c["metadata"]["finalizers"]
        assert c["metadata"]["annotations"][ANNOTATION_POD] == "default/p1"
        assert c["metadata"]["annotations"][ANNOTATION_NODE] == "node-a"
        await cl.event("PartitaAllocated")
        assert not cl.events("PartitaUnschedulable")
    run(scenario)


def test_pod_constraints_pick_the_node() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:8", labels={"pool": "big"})
        cl.add_node("node-b", "A100-SXM4-40GB:1", labels={"pool": "small"})
        cl.add_node("node-c", "H100-SXM5-80GB:8", taints=[{"key": "dedicated", "value": "x", "effect": "NoSchedule"}])
        cl.submit(pod("p1", ["c1"], nodeSelector={"pool": "small"}), claim("c1", [request()]))
        assert node_of(await cl.allocated("c1")) == "node-b"
        # only node-c is left for a pod that tolerates its taint and refuses the others by affinity
        aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "DoesNotExist"}]}]}}}
        cl.submit(pod("p2", ["c2"], affinity=aff,
                      tolerations=[{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]),
                  claim("c2", [request()]))
        assert node_of(await cl.allocated("c2")) == "node-c"
        # a claim selecting an H100 never lands on the A100 node even with nowhere else to go
        cl.submit(pod("p3", ["c3"], nodeSelector={"pool": "small"}),
                  claim("c3", [request(selectors=["device.attributes['gpu.partita.dev'].productName.contains('H100')"])]))
        await cl.event("PartitaUnschedulable")
        assert not (cl.claim("c3").get("status") or {}).get("allocation")
    run(scenario)


def test_unschedulable_event_explains_per_node() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:8")
        cl.add_node("node-b", "H100-SXM5-80GB:8", cpu="1")
        cl.submit(pod("big", ["c1"]), claim("c1", [request(count=16)]))
        _, _, message = await cl.event("PartitaUnschedulable")
        assert "default/c1" in message and "node-a" in message
        p = pod("cpu", ["c2"])
        p["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "4"}
        cl.submit(p, claim("c2", [request()]))
        assert node_of(await cl.allocated("c2")) == "node-a"
        assert cl.controller.why_pending["default/big"]
        assert "default/cpu" not in cl.controller.why_pending
    run(scenario)


def test_two_pods_race_for_the_last_gpu_then_the_loser_gets_it_after_release() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        cl.submit(pod("p2", ["c2"]), claim("c2", [request()]))
        first = await cl.server.wait_for(
            lambda s: next((n for n in ("c1", "c2") if (cl.claim(n).get("status") or {}).get("allocation")), None))
        await cl.event("PartitaUnschedulable")
        other = "c2" if first == "c1" else "c1"
        gpu = devices_of(cl.claim(first))
        assert not (cl.claim(other).get("status") or {}).get("allocation")
        # the winner's pod goes away: its claim is released and the other pod gets the GPU
        cl.server.delete("pods", "p1" if first == "c1" else "p2", "default")
        released = await cl.server.wait_for(
            lambda s: (lambda c: c if not (c.get("status") or {}).get("allocation")
                       and C.CLAIM_FINALIZER not in (c["metadata"].get("finalizers") or []) else None)(cl.claim(first)))
        assert ANNOTATION_POD not in (released["metadata"].get("annotations") or {})
        c = await cl.allocated(other)
        assert devices_of(c) == gpu
    run(scenario)


def test_reserved_claim_is_kept_after_its_pod_is_gone_and_released_when_unreserved() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        c = await cl.allocated("c1")
        c["status"]["reservedFor"] = [{"resource": "pods", "name": "other", "uid": "u-1"}]
        cl.server.update_status(c)
        cl.server.delete("pods", "p1", "default")
        await settle(cl)
        assert cl.claim("c1")["status"]["allocation"]
        c = cl.claim("c1")
        c["status"]["reservedFor"] = []
        cl.server.update_status(c)
        await cl.server.wait_for(lambda s: not (cl.claim("c1").get("status") or {}).get("allocation"))
    run(scenario)


def test_finished_pod_releases_and_deleted_claim_is_let_go() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(pod("job", ["c1"]), claim("c1", [request()]))
        await cl.allocated("c1")
        p = cl.server.get("pods", "job", "default")
        p["spec"]["nodeName"] = "node-a"
        cl.server.update(p)
        p = cl.server.get("pods", "job", "default")
        p["status"]["phase"] = "Succeeded"
        cl.server.update_status(p)
        await cl.server.wait_for(lambda s: not (cl.claim("c1").get("status") or {}).get("allocation"))
        # a claim deleted while allocated (finalizer holds it) is released and then disappears
        cl.submit(pod("p2", ["c2"]), claim("c2", [request()]))
        await cl.allocated("c2")
        cl.server.delete("pods", "p2", "default")
        cl.server.delete("resourceclaims", "c2", "default", group="resource.k8s.io")
        await cl.server.wait_for(lambda s: cl.claim("c2") is None)
    run(scenario)


def test_allocation_cleared_by_kube_scheduler_moves_to_another_node() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.add_node("node-b", "H100-SXM5-80GB:1")
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        c = await cl.allocated("c1")
        first = node_of(c)
        # kube-scheduler's PostFilter: the node turned out unfit, it clears the allocation
        c["status"] = {}
        cl.server.update_status(c)
        moved = await cl.server.wait_for(
            lambda s: (lambda x: x if (x.get("status") or {}).get("allocation") and node_of(x) != first else None)(
                cl.claim("c1")))
        assert node_of(moved) != first
    run(scenario)


def test_conflicts_and_errors_are_retried() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.server.inject_fault("resourceclaims", "update", 409, count=2)
        cl.server.inject_fault("resourceclaims", "update", 500, count=1)
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        c = await cl.allocated("c1")
        assert C.CLAIM_FINALIZER in c["metadata"]["finalizers"]
    run(scenario)


def test_pools_without_the_managed_taint_are_never_used() -> None:
    async def scenario(cl):
        cl.server.drop_features({"DRADeviceTaints"})
        cl.add_node("node-a", "H100-SXM5-80GB:1")   # labelled controller-mode, but the API server dropped the taint
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        await cl.event("PartitaUnschedulable")
        assert not (cl.claim("c1").get("status") or {}).get("allocation")
        assert cl.controller.snapshot()["missing_taint"] == [[C.DEFAULT_DRIVER_NAME, "node-a"]] or \
            cl.controller.snapshot()["missing_taint"] == [(C.DEFAULT_DRIVER_NAME, "node-a")]
    run(scenario)


def test_scheduler_mode_pools_are_left_to_kube_scheduler() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1", features=SliceFeatures(taints=False))
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        await cl.event("PartitaUnschedulable")
        assert not (cl.claim("c1").get("status") or {}).get("allocation")
    run(scenario)


def test_claims_of_other_drivers_and_mixed_claims() -> None:
    async def scenario(cl):
        cl.server.create({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": "nic"},
                          "spec": {"selectors": [{"cel": {"expression": "device.driver == 'net.example.com'"}}]}})
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.submit(pod("nic", ["n1"]), claim("n1", [request(cls="nic")]))
        cl.submit(pod("mixed", ["m1"]), claim("m1", [request("gpu"), request("nic", cls="nic")]))
        _, _, message = await cl.event("PartitaMixedClaim")
        assert "default/m1" in message
        cl.submit(pod("gpu", ["g1"]), claim("g1", [request()]))
        await cl.allocated("g1")
        assert not (cl.claim("n1").get("status") or {}).get("allocation")
        assert not (cl.claim("m1").get("status") or {}).get("allocation")
        assert C.CLAIM_FINALIZER not in (cl.claim("n1")["metadata"].get("finalizers") or [])
    run(scenario)


def test_invalid_config_is_reported_not_allocated() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        bad = [{"requests": ["gpu"], "opaque": {"driver": C.DEFAULT_DRIVER_NAME, "parameters": {
            "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig",
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Forever"}}}}}]
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()], config=bad))
        _, _, message = await cl.event("PartitaInvalidConfig")
        assert "interval" in message and "claim default/c1" in message and "Medium" in message
        assert not (cl.claim("c1").get("status") or {}).get("allocation")
    run(scenario)


def test_template_claims_wait_for_the_resourceclaim_controller() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        p = pod("p1", [])
        p["spec"]["resourceClaims"] = [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}]
        cl.server.create(p)
        await settle(cl)
        assert not cl.controller.events.posted
        cl.server.create(claim("p1-gpu-x1y2z", [request()]))
        p = cl.server.get("pods", "p1", "default")
        p["status"]["resourceClaimStatuses"] = [{"name": "gpu", "resourceClaimName": "p1-gpu-x1y2z"}]
        cl.server.update_status(p)
        await cl.allocated("p1-gpu-x1y2z")
    run(scenario)


def test_all_claims_of_a_pod_land_on_one_node() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.add_node("node-b", "H100-SXM5-80GB:2")
        cl.submit(pod("p1", ["c1", "c2"]), claim("c1", [request()]), claim("c2", [request()]))
        a, b = await cl.allocated("c1"), await cl.allocated("c2")
        assert node_of(a) == node_of(b) == "node-b"
        assert devices_of(a) != devices_of(b)
    run(scenario)


def test_mig_shared_and_whole_use_of_one_gpu_exclude_each_other() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.submit(pod("mig", ["m"]), claim("m", [request(cls=C.DEVICE_CLASS_MIG, selectors=[
            "device.attributes['gpu.partita.dev'].migProfile == '1g.10gb'"])]))
        m = await cl.allocated("m")
        assert "-mig-1g10gb-" in devices_of(m)[0]
        mig_gpu = devices_of(m)[0].split("-mig-")[0]
        cl.submit(pod("nb", ["s"]), claim("s", [request(cls=C.DEVICE_CLASS_SHARED,
                                                       capacity={"requests": {"memory": "10Gi"}})]))
        s = await cl.allocated("s")
        [r] = s["status"]["allocation"]["devices"]["results"]
        assert r["device"].endswith("-shared") and r["shareID"]
        assert r["consumedCapacity"]["memory"] == "10Gi"
        assert not r["device"].startswith(mig_gpu)     # a GPU in MIG use is not time-shared
        # both GPUs are in partial use now: no whole GPU is left
        cl.submit(pod("whole", ["w"]), claim("w", [request()]))
        await cl.event("PartitaUnschedulable")
        assert not (cl.claim("w").get("status") or {}).get("allocation")
        # a second share lands on the shared GPU (packing), a second MIG on the MIG GPU
        cl.submit(pod("nb2", ["s2"]), claim("s2", [request(cls=C.DEVICE_CLASS_SHARED,
                                                          capacity={"requests": {"memory": "10Gi"}})]))
        assert devices_of(await cl.allocated("s2")) == [r["device"]]
        cl.submit(pod("mig2", ["m2"]), claim("m2", [request(cls=C.DEVICE_CLASS_MIG)]))
        assert devices_of(await cl.allocated("m2"))[0].startswith(mig_gpu)


def test_scheduler_mode_controller_only_validates() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:1")
        cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
        await settle(cl)
        assert not (cl.claim("c1").get("status") or {}).get("allocation")
        assert not cl.events("PartitaUnschedulable")
    run(scenario, allocation_mode=C.ALLOCATION_MODE_SCHEDULER)


def test_leader_election_one_active_controller_and_fast_failover() -> None:
    from tests.support.cluster import ControllerThread

    async def main():
        async with cluster(ControllerConfig(**FAST), leader_election=("default", "partita-controller")) as cl:
            standby_running: list = []
            standby = ControllerThread(ControllerConfig(**FAST), cl.server.url, standby_running,
                                       ("default", "partita-controller"))
            standby.start(wait=False)
            try:
                await cl.server.wait_for(lambda s: standby_running and standby_running[-1].leader is not None)
                leader = cl.running[-1].leader
                lease = cl.server.get("leases", "partita-controller", "default")
                assert lease["spec"]["holderIdentity"] == leader.identity
                cl.add_node("node-a", "H100-SXM5-80GB:2")
                cl.submit(pod("p1", ["c1"]), claim("c1", [request()]))
                await cl.allocated("c1")
                assert not standby_running[-1].leader.is_leader
                assert not standby_running[-1].controller.events.posted   # the standby never acts
                # the leader stops cleanly: it hands the lease over instead of letting it expire (15 s)
                await asyncio.get_running_loop().run_in_executor(None, cl._stop_controller)
                lease = await cl.server.wait_for(
                    lambda s: (lambda x: x if x["spec"]["holderIdentity"] == standby_running[-1].leader.identity
                               else None)(s.get("leases", "partita-controller", "default")), timeout=8)
                assert lease["spec"]["leaseTransitions"] == 1
                cl.submit(pod("p2", ["c2"]), claim("c2", [request()]))
                await cl.allocated("c2")
            finally:
                await asyncio.get_running_loop().run_in_executor(None, standby.stop)
    asyncio.run(main())


def test_mps_and_time_slicing_shares_are_kept_on_separate_gpus() -> None:
    """Pack would put every share on the first shared GPU; an MPS share must not join time-sliced ones
    (the plugin would refuse it), so it goes to another GPU, and later MPS shares join it there."""
    mps = [{"requests": ["gpu"], "opaque": {"driver": C.DEFAULT_DRIVER_NAME, "parameters": {
        "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": {"strategy": "MPS"}}}}]

    def share(name: str, config=None) -> dict:
        return claim(name, [request(cls=C.DEVICE_CLASS_SHARED, capacity={"requests": {"memory": "10Gi"}})],
                     config=config)

    async def scenario(cl):
        cl.add_node("node-a", "A100-SXM4-80GB:2")
        cl.submit(pod("nb1", ["ts1"]), share("ts1"))
        ts_dev = devices_of(await cl.allocated("ts1"))
        cl.submit(pod("svc1", ["mps1"]), share("mps1", mps))
        mps_dev = devices_of(await cl.allocated("mps1"))
        assert mps_dev != ts_dev
        cl.submit(pod("svc2", ["mps2"]), share("mps2", mps))
        cl.submit(pod("nb2", ["ts2"]), share("ts2"))
        assert devices_of(await cl.allocated("mps2")) == mps_dev
        assert devices_of(await cl.allocated("ts2")) == ts_dev
    run(scenario, strategy="pack")


def test_a_search_that_exceeds_its_step_limit_leaves_the_pod_pending_with_the_reason() -> None:
    async def scenario(cl):
        cl.add_node("node-a", "H100-SXM5-80GB:2")
        cl.submit(pod("p1", ["c1"]), claim("c1", [request(count=2)]))
        await cl.event("PartitaUnschedulable")
        assert "search" in cl.controller.why_pending["default/p1"].lower()
        assert (cl.claim("c1").get("status") or {}).get("allocation") is None
    run(scenario, max_search_steps=1)
