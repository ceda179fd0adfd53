"""The DeviceClasses Partita ships, one per device type (docs/architecture.md §3).

The Helm chart renders the same objects (a chart test compares them with these), and the sandbox
creates them from here. Selectors guard every lookup with ``in`` so a class selector never errors on
another driver's device or on a device that lacks the ``type`` attribute.
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


def device_classes(driver_name: str = DEFAULT_DRIVER_NAME) -> list[dict]:
    """DeviceClass objects (API JSON) for a driver name."""
    return [
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": class_name(name, driver_name)},
            "spec": {"selectors": [{"cel": {"expression": type_selector(driver_name, dtype)}}]},
        }
        for name, dtype in _CLASS_TYPES
    ]
