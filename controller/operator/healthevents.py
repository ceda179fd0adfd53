"""Events on pods whose allocated devices turned unhealthy (issue 13; docs/health.md).

The node's driver taints a failing device ``gpu.partita.dev/unhealthy=<state>`` in its ResourceSlice. On
every change of one of our slices, :class:`HealthReporter` compares the devices that carry the health taint
with the claims' allocation results and posts, on each running pod that uses such a device:

* ``Warning PartitaDeviceUnhealthy``: which device of which claim, its state and effect, and what follows:
  with NoExecute, upstream's device taint eviction controller (kube-controller-manager, feature gate
  DRADeviceTaints) deletes pods whose claim does not tolerate the taint — Partita does not evict itself;
  with NoSchedule, the pod keeps running and only new allocations avoid the device;
* ``Normal PartitaDeviceRecovered`` once the taint is gone again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from controller.allocator.search import tolerates
from driver.api import constants as C

from .claims import is_done, key

REASON_UNHEALTHY = "PartitaDeviceUnhealthy"
REASON_RECOVERED = "PartitaDeviceRecovered"


@dataclass(frozen=True)
class Hit:
    claim: str            # namespace/name
    device: str           # pool/device
    taint: Mapping
    tolerated: bool


def health_taints(slice_: Mapping, driver: str) -> dict[str, Mapping]:
    """device name -> its health taint, for one slice of ``driver``."""
    spec = slice_.get("spec") or {}
    if spec.get("driver") != driver:
        return {}
    return {d["name"]: t for d in spec.get("devices") or [] for t in d.get("taints") or []
            if t.get("key") == C.HEALTH_TAINT_KEY}


def message(hit: Hit) -> str:
    t = hit.taint
    label = f"{t.get('key')}={t.get('value')}:{t.get('effect')}"
    head = f"device {hit.device} of claim {hit.claim} is {t.get('value')} ({label} since {t.get('timeAdded', '?')})"
    if t.get("effect") == "NoExecute" and not hit.tolerated:
        return (head + "; kube-controller-manager's device taint eviction deletes pods whose claim does not "
                "tolerate it (DRADeviceTaints); Partita does not evict: recreate the pod to get a healthy device")
    if t.get("effect") == "NoExecute":
        return head + "; the claim tolerates it, so the pod keeps running on the failing device"
    return head + "; the pod keeps running, new allocations avoid the device until it recovers"


class HealthReporter:
    def __init__(self, driver: str):
        self.driver = driver
        self._slices: dict[str, dict[tuple[str, str], Mapping]] = {}   # slice -> (pool, device) -> taint
        self._reported: dict[tuple[str, str], str] = {}                 # (claim, pool/device) -> taint value

    def on_slice(self, etype: str, slice_: Mapping) -> bool:
        """Track a slice event; True when its health taints changed (the caller queues :meth:`report`)."""
        name = (slice_.get("metadata") or {}).get("name", "")
        pool = ((slice_.get("spec") or {}).get("pool") or {}).get("name", "")
        new = {} if etype == "DELETED" else {(pool, d): t for d, t in health_taints(slice_, self.driver).items()}
        old = self._slices.get(name, {})
        if new:
            self._slices[name] = new
        else:
            self._slices.pop(name, None)
        return new != old

    def tainted(self) -> dict[tuple[str, str], Mapping]:
        out: dict[tuple[str, str], Mapping] = {}
        for devices in self._slices.values():
            out.update(devices)
        return out

    def hits(self, claims: Iterable[Mapping]) -> tuple[list[Hit], list[tuple[str, str]]]:
        """(allocated devices that carry a health taint, (claim, device) reported before that recovered)."""
        tainted = self.tainted()
        out, current = [], set()
        for c in claims:
            for r in ((((c.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []):
                if r.get("driver") != self.driver:
                    continue
                t = tainted.get((r.get("pool", ""), r.get("device", "")))
                if t is None:
                    continue
                device = f"{r.get('pool')}/{r.get('device')}"
                current.add((key(c), device))
                out.append(Hit(key(c), device, t, any(tolerates(x, t) for x in r.get("tolerations") or [])))
        recovered = [k for k in self._reported if k not in current]
        return out, recovered

    async def report(self, cache, events) -> None:  # noqa: ANN001 - the controller's Cache and EventRecorder
        hits, recovered = self.hits(cache.claims.values())
        for hit in hits:
            if self._reported.get((hit.claim, hit.device)) == hit.taint.get("value"):
                continue
            self._reported[(hit.claim, hit.device)] = str(hit.taint.get("value"))
            for pod in _running_users(cache, hit.claim):
                await events.post(pod, "Warning", REASON_UNHEALTHY, message(hit))
        for claim, device in recovered:
            del self._reported[(claim, device)]
            for pod in _running_users(cache, claim):
                await events.post(pod, "Normal", REASON_RECOVERED,
                                  f"device {device} of claim {claim} is healthy again (its health taint is gone)")


def _running_users(cache, claim_key: str) -> list[dict]:  # noqa: ANN001
    out = []
    for pod_key in sorted(cache.claim_users.get(claim_key, ())):
        pod = cache.pods.get(pod_key)
        if pod is not None and not is_done(pod):
            out.append(pod)
    return out
