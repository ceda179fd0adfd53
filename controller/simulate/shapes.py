"""Request shapes: what one simulated pod asks for, and the ResourceClaim that asks for it.

A shape is written ``gpu:N`` (N whole GPUs), ``mig:PROFILE`` (one MIG device, e.g. ``mig:3g.40gb``) or
``shared:MEMORY`` (a share of a GPU's memory, e.g. ``shared:20Gi``), optionally limited to one GPU
model with ``@MODEL`` (a built-in model key: ``gpu:2@H100-SXM5-80GB``) — in traces, on the command line
and in reports.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from driver.api import constants as C
from driver.api.quantity import Quantity, QuantityError
from driver.nvml.models import get_model, known_models

KINDS = ("gpu", "mig", "shared")
_GI = 1024**3
_MI = 1024**2
_TOLERATE = [C.managed_toleration()]


class Shape(NamedTuple):
    kind: str              # "gpu", "mig" or "shared"
    count: int = 1         # GPUs (kind gpu)
    profile: str = ""      # MIG profile name (kind mig)
    memory: int = 0        # bytes (kind shared)
    model: str = ""        # built-in GPU model key the request is limited to ("" = any)

    def __str__(self) -> str:
        if self.kind == "gpu":
            text = f"gpu:{self.count}"
        elif self.kind == "mig":
            text = f"mig:{self.profile}"
        else:
            text = f"shared:{memory_text(self.memory)}"
        return f"{text}@{self.model}" if self.model else text

    def sort_key(self) -> tuple:
        return (self.model, KINDS.index(self.kind), self.count, self.memory, self.profile)


def memory_text(n: int) -> str:
    return f"{n // _GI}Gi" if n % _GI == 0 else f"{math.ceil(n / _MI)}Mi"


def parse_shape(text: str, model: str = "") -> Shape:
    """``gpu:4``, ``mig:1g.10gb``, ``shared:20Gi`` (``@MODEL`` or ``model`` limits it to a GPU model);
    ValueError with the fix otherwise."""
    body, _, at = str(text).strip().partition("@")
    model = (at or model).strip()
    if model and model not in known_models():
        raise ValueError(f"unknown GPU model {model!r}; use one of: {', '.join(known_models())}")
    kind, sep, arg = body.partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    if not sep or kind not in KINDS or not arg:
        raise ValueError(f"{text!r} is not a request shape; write gpu:N, mig:PROFILE or shared:MEMORY "
                         "(e.g. gpu:4, mig:3g.40gb, shared:20Gi)")
    if kind == "gpu":
        try:
            n = int(arg)
        except ValueError:
            n = 0
        if not 1 <= n <= 64:
            raise ValueError(f"{text!r}: the GPU count must be a whole number from 1 to 64")
        return Shape("gpu", count=n, model=model)
    if kind == "mig":
        return Shape("mig", profile=arg, model=model)
    try:
        q = Quantity.parse(arg)
    except (QuantityError, ValueError):
        raise ValueError(f"{text!r}: {arg!r} is not a memory quantity; write e.g. shared:20Gi") from None
    if q.sign() <= 0:
        raise ValueError(f"{text!r}: the shared memory must be positive")
    return Shape("shared", memory=math.ceil(q.value), model=model)


def claim_for(shape: Shape, name: str, driver: str = C.DEFAULT_DRIVER_NAME) -> dict:
    """The ResourceClaim (API JSON) a pod of this shape would carry, tolerating the controller-mode taint."""
    if shape.kind == "gpu":
        exactly: dict = {"deviceClassName": C.DEVICE_CLASS_GPU, "allocationMode": "ExactCount", "count": shape.count}
    elif shape.kind == "mig":
        exactly = {"deviceClassName": C.DEVICE_CLASS_MIG, "selectors": [{"cel": {"expression":
                   f"device.attributes['{driver}'].{C.ATTR_MIG_PROFILE} == '{shape.profile}'"}}]}
    else:
        exactly = {"deviceClassName": C.DEVICE_CLASS_SHARED,
                   "capacity": {"requests": {C.CAP_MEMORY: memory_text(shape.memory)}}}
    if shape.model:
        product = get_model(shape.model).product_name
        exactly.setdefault("selectors", []).append({"cel": {"expression":
                                                    f"device.attributes['{driver}'].{C.ATTR_PRODUCT_NAME} == '{product}'"}})
    exactly["tolerations"] = _TOLERATE
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "simulate", "uid": name},
            "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}


def whole_gpu_equivalent(shape: Shape) -> Shape:
    """The device-plugin world: every request rounded up to whole GPUs (a MIG device or a share takes one)."""
    return shape if shape.kind == "gpu" else Shape("gpu", count=1, model=shape.model)
