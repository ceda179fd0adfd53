"""NVML backends: one interface (:class:`NvmlBackend`), a real and a fake implementation.

    backend = open_backend("fake", profile=load_profile("gpus.yaml"), node_name="node-a")
    backend.init()

The rest of the driver never knows which one it has.
"""

from __future__ import annotations

from pathlib import Path

from . import errors
from .errors import NvmlError
from .interface import DeviceInfo, MigDeviceInfo, MigMode, NvmlBackend, Placement
from .profile import FakeGpuProfile, ProfileError, load_profile, profile_from_spec

BACKENDS = ("real", "fake")


def open_backend(kind: str, *, profile: FakeGpuProfile | None = None, node_name: str = "",
                 state_dir: str | Path | None = None, events_file: str | Path | None = None) -> NvmlBackend:
    """Construct a backend. ``fake`` needs a profile and the node name; ``state_dir`` keeps the fake
    GPUs' mutable state (MIG instances, ...) across process restarts, as hardware would; ``events_file``
    is the JSON-lines file of injected health events the fake follows."""
    if kind == "real":
        from .real import RealNvml

        return RealNvml()
    if kind == "fake":
        if profile is None:
            raise ValueError("the fake NVML backend needs a GPU profile (--fake-profile FILE)")
        from .fake import FakeNvml

        backend = FakeNvml(profile, node_name, state_dir)
        if events_file is not None:
            backend.set_events_file(events_file)   # injected health events (docs/health.md)
        return backend
    raise ValueError(f"unknown NVML backend {kind!r}; use one of {BACKENDS}")


#: names, and the modules others may import from (interface constants, the fake GPU profiles and models, the
#: real backend for a driver root); fake.py and the rest are the package's own
__all__ = ["BACKENDS", "DeviceInfo", "FakeGpuProfile", "MigDeviceInfo", "MigMode", "NvmlBackend", "NvmlError",
           "Placement", "ProfileError", "errors", "events", "fake", "interface", "load_profile", "models",
           "open_backend", "profile", "profile_from_spec", "real"]
