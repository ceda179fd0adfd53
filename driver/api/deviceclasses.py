"""The DeviceClasses Partita ships, one per device type (docs/architecture.md §3).

The Helm chart renders the same objects (a chart test compares them with these), and the sandbox
creates them from here. Selectors guard every lookup with ``in`` so a class selector never errors on
another driver's device or on a device that lacks the ``type`` attribute.

In scheduler mode the whole-GPU class may carry ``spec.extendedResourceName`` (KEP-5004, the
DRAExtendedResource feature: alpha in 1.34 and 1.35, beta and on by default in 1.36, GA in 1.37): then
kube-scheduler satisfies a pod's ``resources.limits`` of that name (e.g. ``nvidia.com/gpu: 1``, the NVIDIA
device plugin's) with whole GPUs of that class. Controller mode forbids it (docs/architecture.md §4):
kube-scheduler would allocate Partita's devices itself. See docs/migration.md.
"""

from __future__ import annotations

from .constants import (
    DEFAULT_DRIVER_NAME,
    DEVICE_CLASS_GPU,
    DEVICE_CLASS_MIG,
    DEVICE_CLASS_SHARED,
    DEVICE_TYPE_GPU,
    DEVICE_TYPE_MIG,
    DEVICE_TYPE_SHARED,
)
from .naming import MAX_NAME_PART, NAME_PART, is_dns_subdomain

#: the prefix of the extended resource name every DeviceClass has implicitly (KEP-5004)
IMPLICIT_EXTENDED_RESOURCE_PREFIX = "deviceclass.resource.kubernetes.io/"

_CLASS_TYPES = (
    (DEVICE_CLASS_GPU, DEVICE_TYPE_GPU),
    (DEVICE_CLASS_MIG, DEVICE_TYPE_MIG),
    (DEVICE_CLASS_SHARED, DEVICE_TYPE_SHARED),
)


def class_name(base: str, driver_name: str) -> str:
    """Class names follow the driver name: ``gpu.partita.dev`` for the default driver, and
    ``gpu.<driver>`` style names for other driver names (``mig.example.org`` for ``example.org``)."""
    if driver_name == DEFAULT_DRIVER_NAME:
        return base
    prefix = base.split(".", 1)[0]
    suffix = driver_name.split(".", 1)[1] if driver_name.startswith("gpu.") else driver_name
    return f"{prefix}.{suffix}"


def type_selector(driver_name: str, device_type: str) -> str:
    return (
        f"device.driver == '{driver_name}' && "
        f"'type' in device.attributes['{driver_name}'] && "
        f"device.attributes['{driver_name}'].type == '{device_type}'"
    )


def extended_resource_name_error(name: str) -> str | None:
    """Why ``name`` cannot be a DeviceClass's ``extendedResourceName`` (None when it can). The rules are the
    API server's for a pod's extended resource: ``<domain>/<name>``, no kubernetes.io/ in it, and
    ``requests.<domain>/<name>`` a qualified name (names of at most 63 characters, domains of at most 253)."""
    if "/" not in name:
        return "needs a domain prefix, e.g. nvidia.com/gpu"
    prefix, _, short = name.partition("/")
    if "kubernetes.io/" in name:
        return "names under kubernetes.io are Kubernetes' native resources; use your vendor's domain, e.g. nvidia.com/gpu"
    if name.startswith("requests."):
        return "must not start with requests. (the ResourceQuota prefix)"
    full = f"requests.{prefix}"
    if not is_dns_subdomain(full):
        return f"the domain {prefix!r} is not a DNS subdomain (lower case letters, digits, '-' and '.')"
    if len(short) > MAX_NAME_PART or not NAME_PART.fullmatch(short):
        return (f"the name {short!r} after the domain must be at most 63 characters of letters, digits, '-', '_' "
                "and '.', beginning and ending with a letter or digit")
    return None


def device_classes(driver_name: str = DEFAULT_DRIVER_NAME, *, gpu_extended_resource_name: str = "") -> list[dict]:
    """DeviceClass objects (API JSON) for a driver name. ``gpu_extended_resource_name`` (scheduler mode only)
    sets ``spec.extendedResourceName`` on the whole-GPU class; a malformed name raises ValueError."""
    if gpu_extended_resource_name:
        why = extended_resource_name_error(gpu_extended_resource_name)
        if why:
            raise ValueError(f"DeviceClass {class_name(DEVICE_CLASS_GPU, driver_name)} spec.extendedResourceName "
                             f"{gpu_extended_resource_name!r}: {why}")
    out = []
    for name, dtype in _CLASS_TYPES:
        spec: dict = {"selectors": [{"cel": {"expression": type_selector(driver_name, dtype)}}]}
        if name == DEVICE_CLASS_GPU and gpu_extended_resource_name:
            spec["extendedResourceName"] = gpu_extended_resource_name
        out.append({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                    "metadata": {"name": class_name(name, driver_name)}, "spec": spec})
    return out
