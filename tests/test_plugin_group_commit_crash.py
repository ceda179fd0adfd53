"""Crashes of a group-committed batch (issue 18): the real plugin process is SIGKILLed right after a batch
of concurrent share prepares is written to the checkpoint, before any of them is answered, or before the
batch's write; restarted, the kubelet's retries must find exactly the recorded claims prepared (same CDI
devices, specs in place) and the rest not, and the node ends clean."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
import uuid as uuidlib
from pathlib import Path

import grpc
import pytest

from controller.sandbox.apiserver import ApiServer
from controller.sandbox.plugin import PluginProcess
from driver.api import naming
from driver.kubeletapi.dra.v1 import api_pb2 as v1
from driver.kubeletapi.dra.v1 import api_pb2_grpc as v1_grpc
from driver.nvml import open_backend, profile_from_spec
from driver.plugin.checkpoint import CheckpointStore
from driver.plugin.faults import ENV
from tests.support.claims import allocated_claim

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NODE = "node-a"
DRIVER = "gpu.partita.dev"
PROFILE = profile_from_spec("H100-SXM5-80GB:2", NODE)
MEDIUM = {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Medium"}}


@pytest.fixture
def tmp_path():
    """Short: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gcc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Node:
    def __init__(self, tmp_path: Path, server: ApiServer, url: str):
        self.tmp_path, self.server, self.url = tmp_path, server, url
        self.plugin: PluginProcess | None = None

    async def start(self, crash_at: str | None = None) -> None:
        self.plugin = PluginProcess(PROFILE, PROFILE.nodes[0], self.tmp_path, self.url, DRIVER, "DEBUG",
                                    env={ENV: crash_at} if crash_at else None)
        self.plugin.start()
        await self.plugin.wait_ready()

    def backend(self):
        b = open_backend("fake", profile=PROFILE, node_name=NODE,
                         state_dir=self.plugin.paths.plugin_dir(DRIVER) / "fake-nvml")
        b.init()
        return b

    async def calls(self, method: str, claims: list[dict]) -> list:
        """One call per claim, all at once; each call's answer, or the RPC error it got."""
        sock = self.plugin.paths.plugins / DRIVER / "dra.sock"
        req_type = v1.NodePrepareResourcesRequest if method == "NodePrepareResources" else v1.NodeUnprepareResourcesRequest
        async with grpc.aio.insecure_channel(f"unix://{sock}") as ch:
            stub = v1_grpc.DRAPluginStub(ch)

            async def one(c: dict):
                md = c["metadata"]
                req = req_type(claims=[v1.Claim(namespace=md["namespace"], name=md["name"], uid=md["uid"])])
                try:
                    return (await getattr(stub, method)(req, timeout=20)).claims[md["uid"]]
                except grpc.aio.AioRpcError as e:
                    return e
            return await asyncio.gather(*(one(c) for c in claims))

    def recorded(self) -> dict:
        return CheckpointStore(self.plugin.paths.plugin_dir(DRIVER) / "checkpoint.json").read().claims

    def specs(self) -> set[str]:
        return {p.name for p in self.plugin.paths.cdi.glob("*")} if self.plugin.paths.cdi.exists() else set()


def _scenario(tmp_path: Path, body) -> None:
    async def main():
        server = ApiServer()
        url = await server.start()
        node = Node(tmp_path, server, url)
        try:
            await body(node)
        finally:
            if node.plugin is not None:
                node.plugin.stop()
            await server.stop()
    asyncio.run(main())


def _claims(node: Node, n: int) -> list[dict]:
    backend = node.backend()
    shared = [naming.shared_device_name(naming.gpu_device_name(backend.device_info(backend.device_by_index(i)).uuid))
              for i in range(2)]
    config = [{"source": "FromClaim", "requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters": {
        "apiVersion": "gpu.partita.dev/v1alpha1", "kind": "GpuConfig", "sharing": MEDIUM}}}]
    out = []
    for i in range(n):
        d = shared[i % 2]
        out.append(node.server.create(allocated_claim(f"share-{i}", [d], share_ids={d: str(uuidlib.uuid4())},
                                                      config=config, share_memory="2Gi")))
    return out


def _assert_clean(node: Node) -> None:
    backend = node.backend()
    for i in range(2):
        h = backend.device_by_index(i)
        assert backend.time_slice(h) == "Default"
    assert node.specs() == set()
    assert node.recorded() == {}


def test_a_crash_between_the_batch_write_and_the_answers_leaves_the_batch_prepared(tmp_path) -> None:
    async def body(node: Node) -> None:
        await node.start(crash_at="claim-prepared")
        claims = _claims(node, 8)
        answers = await node.calls("NodePrepareResources", claims)
        assert all(isinstance(a, grpc.aio.AioRpcError) for a in answers), answers    # nobody was answered
        assert node.plugin.proc.wait(10) == -signal.SIGKILL, node.plugin.log_tail()
        recorded = node.recorded()
        uids = {c["metadata"]["uid"] for c in claims}
        assert recorded and set(recorded) <= uids
        assert all(e.state == "Prepared" for e in recorded.values())
        # each recorded claim has its spec; no other claim left one
        assert node.specs() == {Path(e.cdi_spec).name for e in recorded.values()}
        await node.start()
        answers = await node.calls("NodePrepareResources", claims)      # the kubelet retries every claim
        for a, c in zip(answers, claims):
            assert not isinstance(a, grpc.aio.AioRpcError) and a.error == "", a
            uid = c["metadata"]["uid"]
            if uid in recorded:                  # answered from the record: the same CDI device
                assert [d.cdi_device_ids for d in a.devices] == [d.cdi_device_ids for d in recorded[uid].devices]
        assert len(node.specs()) == len(claims)
        spec = json.loads((node.plugin.paths.cdi / next(iter(node.specs()))).read_text())
        assert "PARTITA_TIME_SLICE=Medium" in spec["devices"][0]["containerEdits"]["env"]
        answers = await node.calls("NodeUnprepareResources", claims)
        assert all(not isinstance(a, grpc.aio.AioRpcError) and a.error == "" for a in answers), answers
        _assert_clean(node)
    _scenario(tmp_path, body)


def test_a_crash_before_the_batch_write_leaves_nothing_once_the_claims_are_gone(tmp_path) -> None:
    """Killed after the first claim's CDI spec is written, before the batch is recorded: the claims were never
    prepared. Their pods are deleted, so the kubelet never asks again: the restarted plugin must leave no spec
    and no sharing set-up behind."""
    async def body(node: Node) -> None:
        await node.start(crash_at="cdi-spec-written")
        claims = _claims(node, 4)
        answers = await node.calls("NodePrepareResources", claims)
        assert all(isinstance(a, grpc.aio.AioRpcError) for a in answers), answers
        assert node.plugin.proc.wait(10) == -signal.SIGKILL, node.plugin.log_tail()
        assert node.recorded() == {}
        for c in claims:
            node.server.delete("resourceclaims", c["metadata"]["name"], "default", group="resource.k8s.io")
        await node.start()
        answers = await node.calls("NodeUnprepareResources", claims)    # the kubelet's unprepare of unknown claims
        assert all(not isinstance(a, grpc.aio.AioRpcError) and a.error == "" for a in answers), answers
        _assert_clean(node)
    _scenario(tmp_path, body)
