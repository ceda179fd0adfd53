"""Pods that ask for GPUs the device-plugin way, on a cluster where Partita serves GPUs through DRA.

A pod with ``resources.limits: {nvidia.com/gpu: 1}`` (the NVIDIA device plugin's extended resource) gets
nothing from Partita: Partita's GPUs are DRA devices, reached through ResourceClaims. Where no node
advertises that resource (no device plugin runs) and no DeviceClass maps it (KEP-5004
``spec.extendedResourceName``, honoured by kube-scheduler in scheduler mode only), such a pod stays Pending
forever with nothing but kube-scheduler's "Insufficient nvidia.com/gpu". The controller says once per pod
what to do instead (docs/migration.md).

Watched names: the configured ones (``nvidia.com/gpu`` by default), the device plugin's MIG resources
(``nvidia.com/mig-<profile>``) and, in controller mode, the implicit name every Partita DeviceClass has
(``deviceclass.resource.kubernetes.io/<class>``): kube-scheduler cannot allocate Partita's tainted devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from driver.api import constants as C
from driver.api.deviceclasses import IMPLICIT_EXTENDED_RESOURCE_PREFIX, class_name, extended_resource_name_error
from driver.api.quantity import Quantity, QuantityError

DEFAULT_NAMES = ("nvidia.com/gpu",)
MIG_PREFIX = "nvidia.com/mig-"
REASON = "PartitaExtendedResource"
DOC = "docs/migration.md"


def parse_names(text: str, flag: str = "--extended-resource-names") -> tuple[str, ...]:
    """The comma-separated names of ``--extended-resource-names``; a malformed one raises ValueError naming it."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        why = extended_resource_name_error(n)
        if why:
            raise ValueError(f"{flag}: {n!r} is not an extended resource name: {why}")
    return names


def _nonzero(value: object) -> bool:
    try:
        return Quantity.parse(value).as_int() != 0
    except (QuantityError, TypeError, ValueError):
        return True     # the API server would have refused it; treat it as asked for


def requested_resources(pod: Mapping) -> list[str]:
    """Resource names the pod asks for (limits or requests of any container, init container, or the pod)."""
    spec = pod.get("spec") or {}
    out: dict[str, None] = {}
    blocks = [c.get("resources") or {} for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])]
    blocks.append(spec.get("resources") or {})
    for res in blocks:
        for part in ("limits", "requests"):
            for name, value in (res.get(part) or {}).items():
                if _nonzero(value):
                    out[name] = None
    return list(out)


def _advertised(name: str, nodes: Iterable[Mapping]) -> bool:
    return any(_nonzero(((n.get("status") or {}).get("allocatable") or {}).get(name, 0)) for n in nodes)


@dataclass(frozen=True)
class Advice:
    resources: tuple[str, ...]
    reason: str          # short: the sandbox's report and the controller's why_pending
    message: str         # the Event: what to do
    first: bool          # the first time for this pod (post the Event)
    due: bool = True     # False: unserved for less than the delay yet (the watches may still bring the node
                         # or class that serves it); tell nothing, look again


class ExtendedResourceAdvisor:
    def __init__(self, driver_name: str, allocation_mode: str, names: Iterable[str] = DEFAULT_NAMES):
        self.driver = driver_name
        self.mode = allocation_mode
        self.names = tuple(names)
        self._advised: set[str] = set()       # pod uids that got the Event
        self._given: dict[str, str] = {}      # pod uid -> the reason last given, while it holds
        self._since: dict[str, float] = {}    # pod uid -> first seen unserved (monotonic)

    def _watched(self, name: str, partita: set[str]) -> bool:
        if name in self.names or name.startswith(MIG_PREFIX):
            return True
        return (self.mode == C.ALLOCATION_MODE_CONTROLLER and name.startswith(IMPLICIT_EXTENDED_RESOURCE_PREFIX)
                and name[len(IMPLICIT_EXTENDED_RESOURCE_PREFIX):] in partita)

    def _mapped(self, name: str, classes: Mapping[str, Mapping], partita: set[str]) -> bool:
        """A DeviceClass kube-scheduler serves this name from: another driver's in any mode, Partita's only
        in scheduler mode (in controller mode Partita's devices are tainted against kube-scheduler)."""
        for cname, cls in classes.items():
            if cname in partita and self.mode == C.ALLOCATION_MODE_CONTROLLER:
                continue
            if (cls.get("spec") or {}).get("extendedResourceName") == name:
                return True
            if cname not in partita and name == IMPLICIT_EXTENDED_RESOURCE_PREFIX + cname:
                return True
        return self.mode != C.ALLOCATION_MODE_CONTROLLER and name.startswith(IMPLICIT_EXTENDED_RESOURCE_PREFIX)

    def unserved(self, pod: Mapping, nodes: Iterable[Mapping], classes: Mapping[str, Mapping],
                 partita: set[str]) -> list[str]:
        nodes = list(nodes)
        return [n for n in requested_resources(pod) if self._watched(n, partita)
                and not _advertised(n, nodes) and not self._mapped(n, classes, partita)]

    def check(self, pod: Mapping, nodes: Iterable[Mapping], classes: Mapping[str, Mapping], partita: set[str],
              serves_gpus: bool, now: float = 0.0, delay: float = 0.0) -> Advice | None:
        """What to tell about this pending pod, or None. ``serves_gpus``: Partita has published devices.
        Advice is due once the pod has been unserved for ``delay`` seconds (``now``: monotonic)."""
        uid = (pod.get("metadata") or {}).get("uid") or ""
        names = self.unserved(pod, nodes, classes, partita) if serves_gpus else []
        if not names:
            self._given.pop(uid, None)
            self._since.pop(uid, None)
            return None
        listed = ", ".join(names)
        if now - self._since.setdefault(uid, now) < delay:
            return Advice(tuple(names), "", "", False, due=False)
        first = uid not in self._advised
        self._advised.add(uid)
        gpu, mig = class_name(C.DEVICE_CLASS_GPU, self.driver), class_name(C.DEVICE_CLASS_MIG, self.driver)
        cls = mig if all(n.startswith(MIG_PREFIX) for n in names) else gpu
        if self.mode == C.ALLOCATION_MODE_CONTROLLER:
            mapping = "in controller mode no DeviceClass may map an extended resource onto Partita's devices"
        elif cls == mig:
            mapping = "no DeviceClass maps it (extendedResourceName serves whole GPUs only)"
        else:
            mapping = (f"no DeviceClass maps it (scheduler mode: the chart's deviceClasses.gpu.extendedResourceName "
                       f"puts it on {gpu}, KEP-5004)")
        message = (f"this pod requests {listed} (resources.limits/requests), but no node advertises it (the NVIDIA "
                   f"device plugin would) and Partita serves GPUs through DRA ResourceClaims; {mapping}. Remove "
                   f"{listed} from the containers' resources and add a ResourceClaim (or ResourceClaimTemplate) "
                   f"with deviceClassName {cls} to spec.resourceClaims and the container's resources.claims, or "
                   f"run the NVIDIA device plugin on other nodes than Partita's — see {DOC}")
        reason = f"requests {listed}, which Partita does not serve — see {DOC}"
        self._given[uid] = reason
        return Advice(tuple(names), reason, message, first)

    def given(self, pod: Mapping) -> str | None:
        """The reason last given for this pod while it still holds (None once the resource is served)."""
        return self._given.get((pod.get("metadata") or {}).get("uid") or "")

    def forget(self, pod: Mapping) -> None:
        """A pod that is gone or bound no longer needs the advice (bounded memory)."""
        uid = (pod.get("metadata") or {}).get("uid") or ""
        self._advised.discard(uid)
        self._given.pop(uid, None)
        self._since.pop(uid, None)
