"""What the plugin tells the parts that watch prepared claims (claim status, usage metrics, idle detection).

The gRPC service (driver/plugin/server.py) calls :meth:`Observers.prepared` after a claim is prepared and
:meth:`Observers.unprepared` after it is unprepared, each once per claim, with a :class:`ClaimView`: the
claim's names, the pods it is reserved for and, per prepared device, what it is (whole GPU, MIG device or
share) and the physical GPU behind it. Observers never fail a prepare or unprepare: an observer that raises
is logged and the call goes on. Data flows one way: prepare -> observers; no observer changes the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from driver.api import constants as C
from driver.api.quantity import Quantity
from driver.inventory import Inventory
from driver.plugin.checkpoint import PreparedDevice
from driver.plugin.devices import DeviceRef, device_index

log = logging.getLogger(__name__)

#: usage mode label of a device type
MODE_OF_TYPE = {C.DEVICE_TYPE_GPU: "whole", C.DEVICE_TYPE_MIG: "mig", C.DEVICE_TYPE_SHARED: "shared"}


@dataclass(frozen=True)
class DeviceView:
    """One prepared device of a claim."""

    driver: str
    pool: str
    device: str                      # the published device name
    type: str                        # gpu | mig | shared
    gpu_uuid: str                    # the physical GPU (the parent of a MIG device)
    model: str = ""                  # the GPU's product name
    mig_uuid: str = ""
    mig_profile: str = ""            # "1g.10gb"
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    share_id: str = ""
    memory_allocated_bytes: int = 0  # the whole GPU's memory, the MIG instance's, or the share's limit
    admin_access: bool = False

    @property
    def mode(self) -> str:
        return MODE_OF_TYPE.get(self.type, self.type)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """upstream's SharedDeviceID: driver, pool, device and share id"""
        return self.driver, self.pool, self.device, self.share_id


@dataclass(frozen=True)
class ClaimView:
    uid: str
    namespace: str
    name: str
    pods: tuple[tuple[str, str], ...] = ()     # (namespace, name) of the pods in status.reservedFor
    pod_uids: tuple[str, ...] = ()
    generation: int = 0
    devices: tuple[DeviceView, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def _memory(d: PreparedDevice, total: int, mig_mib: int) -> int:
    if d.type == C.DEVICE_TYPE_MIG:
        return mig_mib * 1024 * 1024
    if d.type == C.DEVICE_TYPE_SHARED:
        cap = (d.consumed_capacity or {}).get(C.CAP_MEMORY)
        if cap:
            try:
                return Quantity.parse(cap).as_int()
            except ValueError:
                log.warning("share %s: consumed memory %r is not a quantity", d.device, cap)
    return total


def claim_view(driver_name: str, uid: str, namespace: str, name: str, claim: dict | None,
               devices: Sequence[PreparedDevice], inventory: Inventory,
               index: Mapping[str, DeviceRef] | None = None) -> ClaimView:
    """The view of a prepared claim, from the claim read from the API server (may be None: no pods known)
    and the devices prepare recorded. ``index``: the inventory's :func:`device_index`, when the caller
    keeps one (building it walks every MIG placement of every GPU: too dear for each prepared claim)."""
    if index is None:
        index = device_index(inventory)
    views = []
    for d in devices:
        ref = index.get(d.device)
        gpu = next((g for g in inventory.gpus if g.uuid == d.gpu_uuid), None)
        mig_mib = ref.profile.memory_mib if ref is not None and ref.profile is not None else 0
        profile = ref.profile.name if ref is not None and ref.profile is not None else ""
        views.append(DeviceView(
            driver=driver_name, pool=d.pool, device=d.device, type=d.type, gpu_uuid=d.gpu_uuid,
            model=gpu.product_name if gpu else "", mig_uuid=(d.mig.uuid or "") if d.mig else "",
            mig_profile=profile if d.mig else "",
            gpu_instance_id=d.mig.gpu_instance_id if d.mig else None,
            compute_instance_id=d.mig.compute_instance_id if d.mig else None,
            share_id=d.share_id or "", memory_allocated_bytes=_memory(d, gpu.memory_bytes if gpu else 0, mig_mib),
            admin_access=bool(d.admin_access)))
    status = (claim or {}).get("status") or {}
    consumers = [r for r in status.get("reservedFor") or [] if isinstance(r, dict) and r.get("resource") == "pods"
                 and not r.get("apiGroup")]
    return ClaimView(uid=uid, namespace=namespace, name=name,
                     pods=tuple((namespace, str(r.get("name", ""))) for r in consumers),
                     pod_uids=tuple(str(r.get("uid", "")) for r in consumers),
                     generation=int(((claim or {}).get("metadata") or {}).get("generation") or 0),
                     devices=tuple(views))


class ClaimObserver(Protocol):
    def prepared(self, claim: ClaimView) -> None: ...

    def unprepared(self, uid: str) -> None: ...


class Observers:
    """Fan-out to every observer; never raises."""

    def __init__(self, observers: Iterable[ClaimObserver] = ()):
        self._observers = list(observers)

    def add(self, observer: ClaimObserver) -> None:
        self._observers.append(observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def of_type(self, cls: type) -> object | None:
        """The observer of that class (e.g. the DeviceStatusWriter, whose set_device_health the health monitor
        calls), or None when it is off."""
        return next((o for o in self._observers if isinstance(o, cls)), None)

    def prepared(self, claim: ClaimView) -> None:
        for o in self._observers:
            try:
                o.prepared(claim)
            except Exception:  # noqa: BLE001 - an observer never fails a prepare
                log.exception("claim %s (uid %s): %s failed after prepare", claim, claim.uid, type(o).__name__)

    def unprepared(self, uid: str) -> None:
        for o in self._observers:
            try:
                o.unprepared(uid)
            except Exception:  # noqa: BLE001
                log.exception("claim uid %s: %s failed after unprepare", uid, type(o).__name__)


def notify_prepared(observers: Observers, state, refs, fetched, results) -> None:  # noqa: ANN001
    """After NodePrepareResources: each claim prepared without error, with the claim read for it."""
    for ref, claim in zip(refs, fetched):
        res = results.get(ref.uid)
        if res is None or res.error:
            continue
        try:
            view = claim_view(state.driver_name, ref.uid, ref.namespace, ref.name,
                              claim if isinstance(claim, dict) else None, res.devices, state.inventory,
                              state.devices)
        except Exception:  # noqa: BLE001 - never fails the prepare
            log.exception("claim %s (uid %s): cannot describe its prepared devices", ref, ref.uid)
            continue
        observers.prepared(view)


def notify_unprepared(observers: Observers, refs, errors: dict[str, str]) -> None:  # noqa: ANN001
    for ref in refs:
        if not errors.get(ref.uid):
            observers.unprepared(ref.uid)
