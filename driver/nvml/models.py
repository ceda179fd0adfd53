"""Built-in GPU model data (``models.yaml`` beside this file) for the fake backend.

Lookup is by model key (``H100-SXM5-80GB``) as GPU profile files name them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

_DATA = Path(__file__).with_name("models.yaml")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class MigProfileSpec(_Model):
    name: str
    nvml_constant: int = Field(alias="nvmlConstant")
    id: int
    memory_mib: int = Field(alias="memoryMiB")
    memory_slices: int = Field(alias="memorySlices")
    compute_slices: int = Field(alias="computeSlices")
    multiprocessors: int
    copy_engines: int = Field(alias="copyEngines")
    decoders: int
    encoders: int
    jpeg_engines: int = Field(alias="jpegEngines")
    ofa_engines: int = Field(alias="ofaEngines")
    max_instances: int = Field(alias="maxInstances")
    placement_starts: tuple[int, ...] = Field(alias="placementStarts")
    unverified: bool = False


class MigSpec(_Model):
    memory_slices: int = Field(alias="memorySlices")
    compute_slices: int = Field(alias="computeSlices")
    max_gpu_instances: int = Field(alias="maxGpuInstances")
    profiles: tuple[MigProfileSpec, ...]


class GpuModel(_Model):
    key: str = ""
    product_name: str = Field(alias="productName")
    brand: str
    pci_device_id: str = Field(alias="pciDeviceId")
    memory_mib: int = Field(alias="memoryMiB")
    multiprocessors: int
    cuda_compute_capability: str = Field(alias="cudaComputeCapability")
    architecture: str
    system: str
    mig: MigSpec | None = None

    @property
    def mig_capable(self) -> bool:
        return self.mig is not None

    def profile_by_id(self, profile_id: int) -> MigProfileSpec | None:
        if self.mig is None:
            return None
        return next((p for p in self.mig.profiles if p.id == profile_id), None)

    def profile_by_constant(self, constant: int) -> MigProfileSpec | None:
        if self.mig is None:
            return None
        return next((p for p in self.mig.profiles if p.nvml_constant == constant), None)


class SlotLayout(_Model):
    bus_id: str = Field(alias="busId")
    numa_node: int = Field(alias="numaNode")
    pcie_root: str = Field(alias="pcieRoot")


class Interconnect(_Model):
    """How a system's GPUs reach each other: ``nvswitch`` (all pairs over NVLink) or ``none`` (PCIe only)."""

    nvlink: Literal["nvswitch", "none"]


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, GpuModel], dict[str, tuple[SlotLayout, ...]], dict[str, Interconnect]]:
    raw = yaml.safe_load(_DATA.read_text())
    models = {k: GpuModel(key=k, **v) for k, v in raw["models"].items()}
    systems = {k: tuple(SlotLayout(**s) for s in v) for k, v in raw["systems"].items()}
    links = {k: Interconnect(**v) for k, v in (raw.get("interconnects") or {}).items()}
    return models, systems, links


def interconnect(system: str) -> Interconnect:
    """The system's GPU interconnect (PCIe only where the table does not list it)."""
    return _load()[2].get(system, Interconnect(nvlink="none"))


def known_models() -> list[str]:
    return list(_load()[0])


def get_model(key: str) -> GpuModel:
    models = _load()[0]
    if key not in models:
        raise KeyError(f"unknown GPU model {key!r}; known models: {', '.join(models)}")
    return models[key]


def model_for_product_name(product_name: str) -> GpuModel | None:
    """The built-in model a real GPU's NVML name corresponds to, if any."""
    return next((m for m in _load()[0].values() if m.product_name == product_name), None)


def slot_layout(system: str, slot: int) -> SlotLayout:
    """PCI bus ID, NUMA node and root complex of a slot; slots past the table repeat the pattern
    in the next PCI domain (0001, 0002, ...)."""
    table = _load()[1][system]
    base = table[slot % len(table)]
    domain = slot // len(table)
    if domain == 0:
        return base
    bus = base.bus_id.split(":", 1)[1]
    root_bus = base.pcie_root.split(":", 1)[1]
    return SlotLayout(busId=f"{domain:04x}:{bus}", numaNode=base.numa_node,
                      pcieRoot=f"pci{domain:04x}:{root_bus}")
