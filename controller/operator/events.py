"""Events on pods and nodes that say what the controller did or why it could not.

The same (object, reason, message) is posted at most once per ``dedup_seconds``, so a pending pod
retried every few seconds does not flood the namespace.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Mapping

from driver.api.kube import InvalidName, Kube, KubeError, namespaced_path
from driver.api.messages import MAX_MESSAGE, bound

log = logging.getLogger(__name__)
COMPONENT = "partita-controller"


class EventRecorder:
    def __init__(self, kube: Kube, dedup_seconds: float = 300.0):
        self._kube = kube
        self._dedup = dedup_seconds
        self._seen: dict[tuple[str, str, str], float] = {}
        self.posted: list[tuple[str, str, str]] = []   # (object key, reason, message), for tests

    async def post(self, obj: Mapping, etype: str, reason: str, message: str) -> None:
        md = obj.get("metadata") or {}
        ns = md.get("namespace") or "default"
        k = (f"{obj.get('kind')}/{ns}/{md.get('name')}", reason, message)
        now = time.monotonic()
        if now - self._seen.get(k, -1e9) < self._dedup:
            return
        self._seen[k] = now
        if len(self._seen) > 10000:
            self._seen = {x: t for x, t in self._seen.items() if now - t < self._dedup}
        message = bound(message, MAX_MESSAGE)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{md.get('name', 'object')}.", "namespace": ns},
            "involvedObject": {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj.get("kind", "Pod"),
                               "name": md.get("name"), "namespace": md.get("namespace"), "uid": md.get("uid")},
            "reason": reason, "message": message, "type": etype,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        self.posted.append((k[0], reason, message))
        try:
            await self._kube.create(namespaced_path("/api/v1", ns, "events", kind="Event"), body)
        except (KubeError, InvalidName, OSError) as e:
            log.warning("could not post event %s on %s: %s", reason, k[0], e)
