"""A node's GPU inventory: what NVML reports, as plain pydantic models.

Data flows one way: NVML backend -> :func:`discover` -> :class:`Inventory` -> slice builder
(``driver/slices.py``). Nothing here talks to Kubernetes; nothing downstream talks to NVML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from driver.nvml.interface import GpuFabricInfo, NvmlBackend


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MigPlacement(_Model):
    """``nvmlGpuInstancePlacement_t``: first memory slice and number of memory slices."""

    start: int = Field(ge=0)
    size: int = Field(ge=1)

    @property
    def slices(self) -> range:
        return range(self.start, self.start + self.size)


class MigProfile(_Model):
    """One GPU-instance profile a MIG-capable GPU offers (``nvmlGpuInstanceProfileInfo_t`` + placements)."""

    name: str                    # "1g.10gb", "1g.10gb+me", "7g.80gb"
    profile_id: int              # info.id: the ID nvidia-smi prints and CreateGpuInstance takes (19, 20, 15, 14, 9, 5, 0)
    nvml_constant: int           # NVML_GPU_INSTANCE_PROFILE_* index passed to GetGpuInstanceProfileInfo
    memory_mib: int              # info.memorySizeMB
    compute_slices: int          # info.sliceCount ("Ng")
    memory_slices: int           # placement size
    multiprocessors: int
    copy_engines: int = 0
    decoders: int = 0
    encoders: int = 0
    jpeg_engines: int = 0
    ofa_engines: int = 0
    max_instances: int = 1       # info.instanceCount
    placements: tuple[MigPlacement, ...] = ()


class MigDevice(_Model):
    """A MIG device that exists now (GPU instance + compute instance)."""

    uuid: str                    # "MIG-..."
    profile_id: int
    profile_name: str
    placement: MigPlacement
    gpu_instance_id: int
    compute_instance_id: int
    memory_mib: int
    multiprocessors: int


class Gpu(_Model):
    """One physical GPU."""

    index: int                   # NVML index: informational only, never used in names
    minor: int                   # /dev/nvidia<minor>
    uuid: str                    # "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    product_name: str            # nvmlDeviceGetName, e.g. "NVIDIA H100 80GB HBM3"
    brand: str                   # nvmlDeviceGetBrand as text, e.g. "NVIDIA", "Tesla"
    architecture: str            # "Turing", "Ampere", "Ada Lovelace", "Hopper"
    cuda_compute_capability: str  # "9.0"
    memory_bytes: int            # nvmlDeviceGetMemoryInfo().total
    multiprocessors: int
    pci_bus_id: str              # "0000:18:00.0" (lowercase hex)
    pcie_root: str | None = None  # "pci0000:17"
    numa_node: int | None = None
    pci_device_id: str | None = None  # "0x233010DE"
    #: NVLink fabric clique "<clusterUuid>.<cliqueId>" (nvmlDeviceGetGpuFabricInfoV, registration completed)
    fabric_clique: str | None = None
    #: UUIDs of this node's other GPUs it reaches over NVLink (nvmlDeviceGetP2PStatus, NVLINK)
    nvlink_peers: tuple[str, ...] = ()
    #: the set of this node's GPUs connected over NVLink, named by its lowest PCI bus ID (None: no NVLink peer)
    nvlink_domain: str | None = None
    mig_capable: bool = False
    mig_enabled: bool = False    # current MIG mode
    mig_pending: bool = False    # pending MIG mode (Ampere needs a reset to apply it)
    memory_slices: int = 0       # MIG memory slices (8 on A100/H100/H200), 0 if not MIG capable
    mig_profiles: tuple[MigProfile, ...] = ()
    mig_devices: tuple[MigDevice, ...] = ()  # MIG devices that exist now
    healthy: bool = True


class Inventory(_Model):
    """Everything the driver knows about one node's GPUs."""

    node_name: str
    driver_version: str          # "580.105.08"
    cuda_driver_version: str     # "13.0"
    gpus: tuple[Gpu, ...] = ()
    backend: str = "real"        # "real" or "fake"


def discover(backend: "NvmlBackend", node_name: str) -> Inventory:
    """Read the inventory of this node from an initialized NVML backend (real or fake)."""
    from driver.nvml.errors import GpuLostError, NotSupportedError

    gpus = []
    handles = [backend.device_by_index(i) for i in range(backend.device_count())]
    infos = [backend.device_info(h) for h in handles]
    topology = _topology(backend, handles, [i.pci_bus_id for i in infos], [i.uuid for i in infos])
    for index, (h, info) in enumerate(zip(handles, infos)):
        try:
            mode = backend.mig_mode(h)
        except (NotSupportedError, GpuLostError):     # a lost GPU is inventoried unhealthy, without MIG
            mode = None
        profiles: list[MigProfile] = []
        devices: list[MigDevice] = []
        memory_slices = 0
        if mode is not None:
            for p, placements in backend.gpu_instance_profiles(h):
                if not placements:
                    continue
                memory_slices = max([memory_slices] + [pl.start + pl.size for pl in placements])
                profiles.append(MigProfile(
                    name=p.name, profile_id=p.id, nvml_constant=p.nvml_constant, memory_mib=p.memory_size_mb,
                    compute_slices=p.slice_count, memory_slices=placements[0].size,
                    multiprocessors=p.multiprocessor_count, copy_engines=p.copy_engine_count,
                    decoders=p.decoder_count, encoders=p.encoder_count, jpeg_engines=p.jpeg_count,
                    ofa_engines=p.ofa_count, max_instances=p.instance_count,
                    placements=tuple(MigPlacement(start=pl.start, size=pl.size) for pl in placements)))
            if mode.current:
                devices = [MigDevice(uuid=d.uuid, profile_id=d.profile_id, profile_name=d.profile_name,
                                     placement=MigPlacement(start=d.placement.start, size=d.placement.size),
                                     gpu_instance_id=d.gpu_instance_id, compute_instance_id=d.compute_instance_id,
                                     memory_mib=d.memory_mib, multiprocessors=d.multiprocessors)
                           for d in backend.mig_devices(h)]
        gpus.append(Gpu(
            index=index, minor=info.minor, uuid=info.uuid, product_name=info.name, brand=info.brand,
            architecture=info.architecture, cuda_compute_capability=info.cuda_compute_capability,
            memory_bytes=info.memory_total_bytes, multiprocessors=info.multiprocessors, pci_bus_id=info.pci_bus_id,
            pcie_root=info.pcie_root, numa_node=info.numa_node, pci_device_id=info.pci_device_id,
            **topology[index], mig_capable=mode is not None, mig_enabled=bool(mode and mode.current),
            mig_pending=bool(mode and mode.pending), memory_slices=memory_slices,
            mig_profiles=tuple(sorted(profiles, key=lambda p: (p.memory_slices, p.compute_slices, p.nvml_constant))),
            mig_devices=tuple(devices), healthy=backend.is_healthy(h)))
    return Inventory(node_name=node_name, driver_version=backend.driver_version(),
                     cuda_driver_version=backend.cuda_driver_version(), gpus=tuple(gpus), backend=backend.kind)


def _topology(backend: "NvmlBackend", handles: list, bus_ids: list[str], uuids: list[str]) -> list[dict]:
    """Per GPU: its NVLink fabric clique and NVLink peers on this node, and the NVLink domain (connected
    set) it belongs to. Read-only calls; a GPU or driver that cannot answer has none of them."""
    from driver.nvml.errors import NvmlError
    from driver.nvml.interface import P2P_STATUS_OK

    cliques: list[str | None] = []
    for h in handles:
        try:
            cliques.append(_fabric_clique(backend.gpu_fabric_info(h)))
        except NvmlError:
            cliques.append(None)
    peers: list[set[int]] = [set() for _ in handles]
    for i in range(len(handles)):
        for j in range(i + 1, len(handles)):
            try:
                linked = backend.nvlink_p2p_status(handles[i], handles[j]) == P2P_STATUS_OK
            except NvmlError:
                linked = False
            if linked:
                peers[i].add(j)
                peers[j].add(i)
    domains: list[str | None] = [None] * len(handles)
    for i in range(len(handles)):
        if domains[i] is not None or not peers[i]:
            continue
        members, todo = {i}, [i]
        while todo:
            for j in peers[todo.pop()] - members:
                members.add(j)
                todo.append(j)
        name = min(bus_ids[m] for m in members)
        for m in members:
            domains[m] = name
    return [{"fabric_clique": cliques[i], "nvlink_domain": domains[i],
             "nvlink_peers": tuple(sorted(uuids[j] for j in peers[i]))} for i in range(len(handles))]


def _fabric_clique(f: "GpuFabricInfo") -> str | None:
    """``<clusterUuid>.<cliqueId>`` once the GPU's fabric registration completed successfully and put it in a
    cluster (a zero cluster UUID with clique 0 is no cluster)."""
    from driver.nvml.interface import FABRIC_STATE_COMPLETED

    if f.state != FABRIC_STATE_COMPLETED or f.status != 0:
        return None
    if f.cluster_uuid == "00000000-0000-0000-0000-000000000000" and f.clique_id == 0:
        return None
    return f"{f.cluster_uuid}.{f.clique_id}"
