"""The API emulator's watch and fault test hooks: compaction (410 on resume), dropped watches, delayed
requests, and the HTTP hooks a server run as a process serves only when asked to."""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.sandbox.apiserver import ApiServer
from driver.api.kube import Kube, KubeError

pytestmark = pytest.mark.timeout(30)

PODS = "/api/v1/namespaces/default/pods"


def _pod(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}


async def _first_events(kube: Kube, rv: str, n: int = 1) -> list[dict]:
    out = []
    async for ev in kube.watch(PODS, resource_version=rv, timeout_seconds=2):
        if ev["type"] != "BOOKMARK":
            out.append(ev)
        if len(out) >= n:
            break
    return out


def test_compact_makes_an_older_resume_get_410_and_a_current_one_still_resume() -> None:
    async def main() -> None:
        server = ApiServer(bookmark_interval=0.2)
        await server.start()
        kube = await Kube.connect(server.url)
        try:
            old = server.create(_pod("a"))["metadata"]["resourceVersion"]
            server.create(_pod("b"))
            [ev] = await _first_events(kube, old)
            assert ev["type"] == "ADDED" and ev["object"]["metadata"]["name"] == "b"
            server.compact("pods")
            [ev] = await _first_events(kube, old)
            assert ev["type"] == "ERROR" and ev["object"]["code"] == 410
            current = str(server.resource_version)
            server.create(_pod("c"))
            [ev] = await _first_events(kube, current)
            assert ev["object"]["metadata"]["name"] == "c"
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_drop_watches_ends_open_streams() -> None:
    async def main() -> None:
        server = ApiServer(bookmark_interval=0.2)
        await server.start()
        kube = await Kube.connect(server.url)
        try:
            got: list[str] = []

            async def watch() -> None:
                async for ev in kube.watch(PODS, resource_version=str(server.resource_version), timeout_seconds=20):
                    got.append(ev["type"])

            task = asyncio.create_task(watch())
            for _ in range(250):                   # until the watch is registered (no write to wait for)
                if server.open_watches:
                    break
                await asyncio.sleep(0.02)
            assert server.drop_watches("pods") == 1
            await asyncio.wait_for(task, 5)        # the stream ended well before its 20 s timeout
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_a_delay_fault_serves_the_request_late_and_an_error_fault_refuses_it() -> None:
    async def main() -> None:
        server = ApiServer()
        await server.start()
        kube = await Kube.connect(server.url)
        try:
            server.inject_fault("pods", "create", 0, count=1, delay=0.4)
            t0 = time.monotonic()
            await kube.create(PODS, _pod("slow"))
            assert time.monotonic() - t0 >= 0.4
            assert server.get("pods", "slow", "default") is not None          # delayed, then served
            server.inject_fault("pods", "create", 503, count=1)
            with pytest.raises(KubeError) as e:
                await kube.create(PODS, _pod("refused"))
            assert e.value.status == 503 and server.get("pods", "refused", "default") is None
            with pytest.raises(ValueError, match="not an HTTP error"):
                server.inject_fault("pods", "create", 200)
        finally:
            await kube.close()
            await server.stop()
    asyncio.run(main())


def test_http_test_hooks_are_served_only_when_enabled() -> None:
    async def main() -> None:
        for enabled in (False, True):
            server = ApiServer(test_hooks=enabled)
            await server.start()
            kube = await Kube.connect(server.url)
            try:
                if not enabled:
                    with pytest.raises(KubeError) as e:
                        await kube.request("POST", "/_test/compact", body={})
                    assert e.value.status == 404
                    continue
                await kube.request("POST", "/_test/fault", body={"plural": "pods", "verb": "create", "status": 409})
                with pytest.raises(KubeError) as e:
                    await kube.create(PODS, _pod("x"))
                assert e.value.status == 409
                with pytest.raises(KubeError) as e:
                    await kube.request("POST", "/_test/fault", body={"plural": "pods"})
                assert e.value.status == 400 and "verb" in e.value.message
                with pytest.raises(KubeError) as e:
                    await kube.request("POST", "/_test/nope", body={})
                assert e.value.status == 404 and "known" in e.value.message
            finally:
                await kube.close()
                await server.stop()
    asyncio.run(main())
