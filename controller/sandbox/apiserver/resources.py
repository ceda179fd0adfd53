"""The resources the emulator serves (group, version, plural, kind, scope, subresources): its REST mapping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resource:
    group: str            # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...] = ()
    short: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """The store key: ``<group>/<plural>`` (events exist in two groups, so the plural alone would mix them)."""
        return f"{self.group}/{self.plural}"

    @property
    def has_status(self) -> bool:
        """A status subresource: main writes keep the stored status, status writes change only status."""
        return "status" in self.subresources


RESOURCES = [
    Resource("", "v1", "pods", "Pod", True, ("status", "binding", "eviction")),
    Resource("", "v1", "nodes", "Node", False, ("status",)),
    Resource("", "v1", "namespaces", "Namespace", False, ("status",)),
    Resource("", "v1", "events", "Event", True),
    Resource("", "v1", "configmaps", "ConfigMap", True),
    Resource("", "v1", "services", "Service", True),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True),
    Resource("events.k8s.io", "v1", "events", "Event", True),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", True),
    Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("status",), ("pdb",)),
    Resource("resource.k8s.io", "v1", "resourceslices", "ResourceSlice", False),
    Resource("resource.k8s.io", "v1", "resourceclaims", "ResourceClaim", True, ("status",)),
    Resource("resource.k8s.io", "v1", "resourceclaimtemplates", "ResourceClaimTemplate", True),
    Resource("resource.k8s.io", "v1", "deviceclasses", "DeviceClass", False),
    Resource("resource.k8s.io", "v1alpha3", "devicetaintrules", "DeviceTaintRule", False),   # as 1.33-1.35 serve it
    Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False),
]
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}


def resource_named(plural: str, group: str | None = None) -> Resource:
    """The resource of ``plural`` (in ``group``; the first group serving it when None)."""
    for r in RESOURCES:
        if r.plural == plural and (group is None or r.group == group):
            return r
    raise KeyError(f"unknown resource {plural!r}")


def resource_of(obj: dict) -> Resource:
    """The resource of an object, by its apiVersion and kind."""
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    for r in RESOURCES:
        if r.kind == obj.get("kind") and r.group == group and r.version == version:
            return r
    raise KeyError(f"unknown kind {obj.get('kind')} {api}")
