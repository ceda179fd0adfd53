"""This Node's labels for the plugin's node check (:func:`driver.plugin.admission.check_allocated_here`).

An allocation's nodeSelector may test node labels; the plugin reads its Node from the API server in
the background (never delaying start-up: the kubelet-facing sockets serve without an API server) and
re-reads it periodically, so a relabelled node is seen within a minute. Until the first read succeeds
the labels are unknown and label-based selectors are refused (the kubelet retries the prepare).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from driver.api.kube import Kube, node_path

log = logging.getLogger(__name__)


class LabelHolder(Protocol):
    node_labels: dict[str, str] | None


async def read_node_labels(kube: Kube, node_name: str) -> dict[str, str]:
    node = await kube.get(node_path(node_name))
    labels = (node.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


async def follow_node_labels(holder: LabelHolder, kube: Kube, node_name: str, stop: asyncio.Event, *,
                             every: float = 60.0, max_backoff: float = 30.0) -> None:
    """Keep ``holder.node_labels`` equal to Node ``node_name``'s labels until ``stop`` is set."""
    backoff = 1.0
    failing = False
    while not stop.is_set():
        try:
            labels = await read_node_labels(kube, node_name)
        except Exception as e:  # noqa: BLE001 - API errors, an unreachable server (aiohttp), bad JSON: retry
            if not failing:
                log.warning("cannot read Node %s for its labels (%s); allocations whose nodeSelector tests labels "
                            "are refused until it can be read; retrying", node_name, e)
            failing = True
            wait = backoff
            backoff = min(backoff * 2, max_backoff)
        else:
            if labels != holder.node_labels:
                log.info("Node %s labels: %s", node_name, labels)
            holder.node_labels = labels
            failing = False
            backoff = 1.0
            wait = every
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
