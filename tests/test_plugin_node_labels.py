"""The plugin learns its Node's labels from the API server (for label-based allocation nodeSelectors)
in the background: unknown while the server cannot be read, then followed as the Node is relabelled."""

from __future__ import annotations

import asyncio

from controller.sandbox.apiserver import ApiServer
from driver.api.kube import Kube
from driver.plugin.nodelabels import follow_node_labels

NODE = "node-a"


class Holder:
    node_labels: dict[str, str] | None = None


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_node_labels_are_read_and_followed_and_unknown_until_the_node_can_be_read() -> None:
    async def main():
        server = ApiServer(bookmark_interval=0.5)
        await server.start()
        kube = await Kube.connect(server.url)
        holder, stop = Holder(), asyncio.Event()
        task = asyncio.create_task(follow_node_labels(holder, kube, NODE, stop, every=0.05, max_backoff=0.05))
        try:
            await asyncio.sleep(0.2)
            assert holder.node_labels is None          # no Node yet: unknown, and the follower keeps trying
            node = server.create({"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": NODE, "labels": {"zone": "a"}}})
            await _until(lambda: holder.node_labels == {"zone": "a"})
            node["metadata"]["labels"] = {"zone": "b", "pool": "gpu"}
            server.update(node)
            await _until(lambda: holder.node_labels == {"zone": "b", "pool": "gpu"})
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
            await kube.close()
            await server.stop()
    asyncio.run(main())
