"""KEP-4817: the plugin writes prepared claims' status.devices, the sandbox API server validates it as upstream."""

from __future__ import annotations

import asyncio

import pytest

from controller.sandbox.apiserver import ApiServer
from driver.api import naming
from driver.api.kube import Kube
from driver.inventory import discover
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.claims import KubeClaimSource
from driver.plugin.devicestatus import CONDITION_HEALTHY, CONDITION_IDLE, CONDITION_READY, Condition, \
    DeviceStatusWriter
from driver.plugin.observers import Observers
from driver.plugin.prepare import DeviceState
from driver.plugin.server import DraService
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from tests.support.claims import allocated_claim

NODE = "node-a"
DRIVER = "gpu.partita.dev"
SHARE = "0f0f0f0f-1111-2222-3333-444444444444"


class Harness:
    def __init__(self, server: ApiServer, kube: Kube, tmp_path):
        self.server = server
        backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:3", NODE), node_name=NODE,
                               state_dir=tmp_path / "nvml")
        backend.init()
        self.backend = backend
        self.inv = discover(backend, NODE)
        self.state = DeviceState(driver_name=DRIVER, node_name=NODE, backend=backend, inventory=self.inv,
                                 cdi_root=tmp_path / "cdi", plugin_dir=tmp_path / "plugin", cdi_search_dirs=[])
        self.writer = DeviceStatusWriter(kube, DRIVER, NODE, retry_delays=(0.05, 0.05))
        self.svc = DraService(self.state, KubeClaimSource(kube), Observers([self.writer]))

    def gpu(self, i: int) -> str:
        return naming.gpu_device_name(self.inv.gpus[i].uuid)

    def create(self, claim: dict) -> dict:
        return self.server.create(claim)

    def stored(self, claim: dict) -> dict:
        return self.server.get("resourceclaims", claim["metadata"]["name"], "default")

    async def prepare(self, *claims: dict) -> dict:
        req = v1.NodePrepareResourcesRequest(claims=[
            v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"]) for c in claims])
        resp = await self.svc.prepare(req, v1)
        await self.writer.drain()
        return resp

    async def unprepare(self, *claims: dict) -> dict:
        req = v1.NodeUnprepareResourcesRequest(claims=[
            v1.Claim(namespace="default", name=c["metadata"]["name"], uid=c["metadata"]["uid"]) for c in claims])
        resp = await self.svc.unprepare(req, v1)
        await self.writer.drain()
        return resp


def _run(tmp_path, scenario, drop=()):
    async def main():
        server = ApiServer(bookmark_interval=0.5)
        await server.start()
        server.drop_features(drop)
        kube = await Kube.connect(server.url)
        try:
            await scenario(Harness(server, kube, tmp_path))
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def _conds(entry: dict) -> dict[str, dict]:
    return {c["type"]: c for c in entry["conditions"]}


def test_prepare_writes_status_devices_with_uuids_and_unprepare_clears_it(tmp_path) -> None:
    async def scenario(h: Harness):
        mig_dev = next(n for n, d in h.state._devices.items() if d.type == "mig" and d.gpu is h.inv.gpus[1]
                       and d.profile.name == "1g.10gb")
        shared = naming.shared_device_name(h.gpu(2))
        whole = h.create(allocated_claim("whole", [h.gpu(0)], extra_results=[
            {"request": "gpu", "driver": "net.example.com", "pool": NODE, "device": "nic0"}]))
        mig = h.create(allocated_claim("mig", [mig_dev], request="m"))
        share = h.create(allocated_claim("share", [shared], share_ids={shared: SHARE}))
        # another driver's entry is someone else's: kept as it is
        other = {"driver": "net.example.com", "pool": NODE, "device": "nic0", "conditions": []}
        whole["status"]["devices"] = [other]
        whole = h.server.update_status(whole)
        resp = await h.prepare(whole, mig, share)
        assert all(not c.error for c in resp.claims.values())

        w = h.stored(whole)["status"]["devices"]
        assert w[0] == other
        [entry] = w[1:]
        assert (entry["driver"], entry["pool"], entry["device"]) == (DRIVER, NODE, h.gpu(0))
        assert entry["data"] == {"type": "gpu", "gpuUUID": h.inv.gpus[0].uuid, "productName": h.inv.gpus[0].product_name}
        c = _conds(entry)
        assert c[CONDITION_READY]["status"] == "True" and c[CONDITION_HEALTHY]["status"] == "True"
        assert c[CONDITION_READY]["reason"] == "Prepared" and c[CONDITION_READY]["lastTransitionTime"]

        [m] = h.stored(mig)["status"]["devices"]
        created = h.backend.mig_devices(h.backend.device_by_uuid(h.inv.gpus[1].uuid))
        assert m["data"]["migUUID"] == created[0].uuid and m["data"]["migUUID"].startswith("MIG-")
        assert m["data"]["gpuUUID"] == h.inv.gpus[1].uuid and m["data"]["migProfile"] == "1g.10gb"
        assert m["data"]["gpuInstanceID"] == created[0].gpu_instance_id

        [s] = h.stored(share)["status"]["devices"]
        assert s["shareID"] == SHARE and s["data"]["shareID"] == SHARE and s["data"]["type"] == "shared"

        # idempotent: a second prepare writes nothing
        rv = h.stored(whole)["metadata"]["resourceVersion"]
        await h.prepare(whole)
        assert h.stored(whole)["metadata"]["resourceVersion"] == rv

        await h.unprepare(whole, mig, share)
        assert h.stored(whole)["status"]["devices"] == [other]
        assert "devices" not in h.stored(mig)["status"]
        assert "devices" not in h.stored(share)["status"]
    _run(tmp_path, scenario)


def test_health_and_idle_conditions_change_and_keep_their_transition_times(tmp_path) -> None:
    async def scenario(h: Harness):
        times = iter(f"2026-01-01T00:00:{i:02d}Z" for i in range(60))
        h.writer._now = lambda: next(times)
        whole = h.create(allocated_claim("whole", [h.gpu(0)]))
        await h.prepare(whole)
        first = _conds(h.stored(whole)["status"]["devices"][0])
        assert h.writer.set_device_health(h.inv.gpus[0].uuid, False, "XidCriticalError", "XID 79 on the GPU") == 1
        assert h.writer.set_device_health(h.inv.gpus[1].uuid, False, "XidCriticalError") == 0   # nothing prepared
        await h.writer.drain()
        c = _conds(h.stored(whole)["status"]["devices"][0])
        assert c[CONDITION_HEALTHY]["status"] == "False" and c[CONDITION_HEALTHY]["reason"] == "XidCriticalError"
        assert c[CONDITION_HEALTHY]["message"] == "XID 79 on the GPU"
        assert c[CONDITION_HEALTHY]["lastTransitionTime"] != first[CONDITION_HEALTHY]["lastTransitionTime"]
        assert c[CONDITION_READY] == first[CONDITION_READY]          # unchanged: same transition time

        assert h.writer.set_claim_condition(whole["metadata"]["uid"], Condition(
            CONDITION_IDLE, "True", "BelowThreshold", "utilization 0.01 below 0.05 for 600s"))
        assert not h.writer.set_claim_condition("not-prepared", Condition(CONDITION_IDLE, "True", "BelowThreshold"))
        h.writer.set_device_health(h.inv.gpus[0].uuid, True)
        await h.writer.drain()
        c = _conds(h.stored(whole)["status"]["devices"][0])
        assert c[CONDITION_IDLE]["status"] == "True" and c[CONDITION_IDLE]["reason"] == "BelowThreshold"
        assert c[CONDITION_HEALTHY]["status"] == "True"
    _run(tmp_path, scenario)


def test_an_api_server_without_device_status_is_detected_once_and_not_written_again(tmp_path, caplog) -> None:
    async def scenario(h: Harness):
        a = h.create(allocated_claim("a", [h.gpu(0)]))
        b = h.create(allocated_claim("b", [h.gpu(1)]))
        resp = await h.prepare(a)
        assert not resp.claims[a["metadata"]["uid"]].error
        assert not h.writer.enabled and "devices" not in h.stored(a)["status"]
        rv = h.stored(b)["metadata"]["resourceVersion"]
        resp = await h.prepare(b)
        assert not resp.claims[b["metadata"]["uid"]].error
        assert h.stored(b)["metadata"]["resourceVersion"] == rv          # not even tried
    _run(tmp_path, scenario, drop={"DRAResourceClaimDeviceStatus"})
    assert sum("does not serve KEP-4817" in r.message for r in caplog.records) == 1


def test_a_failed_status_write_never_fails_the_prepare_and_is_retried(tmp_path) -> None:
    async def scenario(h: Harness):
        a = h.create(allocated_claim("a", [h.gpu(0)]))
        h.server.inject_fault("resourceclaims", "update", 500, count=2)
        resp = await h.prepare(a)
        assert not resp.claims[a["metadata"]["uid"]].error
        assert h.stored(a)["status"]["devices"][0]["device"] == h.gpu(0)
        h.server.inject_fault("resourceclaims", "update", 500, count=10)
        resp = await h.unprepare(a)            # gives up after its retries; the unprepare is done
        assert resp.claims[a["metadata"]["uid"]].error == ""
    _run(tmp_path, scenario)


def test_a_claim_deallocated_meanwhile_loses_its_entries_on_the_server(tmp_path) -> None:
    async def scenario(h: Harness):
        a = h.create(allocated_claim("a", [h.gpu(0)]))
        await h.prepare(a)
        stored = h.stored(a)
        assert stored["status"]["devices"]
        stored["status"].pop("allocation")         # the controller clears the allocation, status.devices untouched
        after = h.server.update_status(stored)
        assert "devices" not in after["status"]     # dropDeallocatedStatusDevices
        await h.unprepare(a)
    _run(tmp_path, scenario)


# -- the emulator validates status.devices as upstream's validateDeviceStatus --------------------------------
def _status_write(server: ApiServer, claim: dict, devices: list) -> None:
    claim = server.get("resourceclaims", claim["metadata"]["name"], "default")
    claim["status"]["devices"] = devices
    server.update_status(claim)


def _cond(**kw) -> dict:
    return {"type": "Ready", "status": "True", "reason": "Prepared", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z", **kw}


@pytest.mark.parametrize("entry, field, detail", [
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-other"}, "status.devices[0]",
     "must be an allocated device in the claim"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "shareID": SHARE}, "status.devices[0]",
     "must be an allocated device in the claim"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "shareID": "not-a-uuid"}, "status.devices[0].shareID",
     "UUID"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond()] * 9},
     "status.devices[0].conditions", "must have at most 8 items"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond(), _cond()]},
     "status.devices[0].conditions[1].type", "Duplicate value"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond(reason="")]},
     "status.devices[0].conditions[0].reason", "Required value"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond(reason="not ok")]},
     "status.devices[0].conditions[0].reason", "a condition reason must start with alphabetic character"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond(status="Yes")]},
     "status.devices[0].conditions[0].status", "Unsupported value"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond(lastTransitionTime=None)]},
     "status.devices[0].conditions[0].lastTransitionTime", "must be set"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "data": {"x": "y" * 10240}}, "status.devices[0].data",
     "may not be more than 10240 bytes"),
    ({"driver": DRIVER, "pool": NODE, "device": "gpu-0", "data": ["a"]}, "status.devices[0].data",
     "must be a valid JSON object"),
])
def test_the_emulator_refuses_invalid_device_status_like_upstream(entry, field, detail) -> None:
    async def main():
        server = ApiServer()
        await server.start()
        try:
            claim = server.create(allocated_claim("c", ["gpu-0"]))
            with pytest.raises(Exception) as e:
                _status_write(server, claim, [entry])
            assert e.value.code == 422
            causes = e.value.details["causes"]
            assert any(c["field"] == field and detail in c["message"] for c in causes), causes
            # the valid entry goes in; twice is a duplicate
            ok = {"driver": DRIVER, "pool": NODE, "device": "gpu-0", "conditions": [_cond()], "data": {"a": 1}}
            _status_write(server, claim, [ok])
            with pytest.raises(Exception, match="Duplicate value"):
                _status_write(server, claim, [ok, ok])
        finally:
            await server.stop()
    asyncio.run(main())


def test_a_forbidden_status_write_names_the_rbac_fix_once_and_the_prepare_succeeds(tmp_path, caplog) -> None:
    async def scenario(h: Harness):
        a = h.create(allocated_claim("a", [h.gpu(0)]))
        b = h.create(allocated_claim("b", [h.gpu(1)]))
        h.server.inject_fault("resourceclaims", "update", 403, count=2)
        for c in (a, b):
            resp = await h.prepare(c)
            assert not resp.claims[c["metadata"]["uid"]].error
        assert "devices" not in h.stored(a)["status"]
        assert h.writer.enabled                  # RBAC can be fixed without a restart: later writes try again
    _run(tmp_path, scenario)
    msgs = [r.getMessage() for r in caplog.records if "not allowed to write its status.devices" in r.getMessage()]
    assert len(msgs) == 1 and "associated-node:update on resourceclaims/driver" in msgs[0]
