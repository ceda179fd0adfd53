"""The simulated cluster: a cluster spec -> fake inventories -> the driver's real ResourceSlices.

Every node's slices come from :func:`driver.slices.build_slices` on the inventory the fake NVML backend
reports for it (controller mode: tainted devices, partitionable devices and consumable capacity on),
loaded once into one :class:`~controller.allocator.SliceIndex` that every strategy shares read-only.
Alongside, a table from each published device to its physical GPU says how much of the GPU a result
holds, which is what the metrics count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from controller.allocator import Node, SliceIndex
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.api.quantity import Quantity
from driver.inventory import Inventory, discover
from driver.nvml import open_backend
from driver.nvml.profile import FakeGpuProfile, ProfileError, load_profile, parse_profile, profile_from_spec
from driver.slices import build_slices

from .errors import SimulateError

DEFAULT_NODES = 16
DEFAULT_GPUS = "H100-SXM5-80GB:8"


@dataclass(frozen=True)
class Gpu:
    """One physical GPU of the cluster."""

    index: int             # position in Cluster.gpus
    node: str
    uuid: str
    model: str             # built-in model key, e.g. H100-SXM5-80GB
    memory: int            # bytes
    memory_slices: int     # MIG memory slices (0 without MIG)
    mig_profiles: dict[str, int]   # MIG profile name -> memory slices, where the GPU offers MIG


@dataclass(frozen=True)
class Device:
    """What holding one published device means for its GPU."""

    gpu: int               # Gpu.index
    type: str              # gpu, mig, shared
    held: float            # share of the GPU a dedicated allocation holds (shared: per byte, see Cluster.held)


@dataclass
class Cluster:
    nodes: list[Node]
    slices: SliceIndex
    classes: dict[str, dict]
    gpus: list[Gpu]
    devices: dict[tuple[str, str], Device]        # (pool, device name) -> Device
    spec: list[str] = field(default_factory=list)  # "NAME=MODEL:COUNT" per node, for the report

    def held(self, result: dict) -> tuple[int, float]:
        """(GPU index, share of that GPU) one device result of an AllocationResult holds."""
        dev = self.devices[(result["pool"], result["device"])]
        if dev.type == "shared":
            memory = (result.get("consumedCapacity") or {}).get(C.CAP_MEMORY)
            used = float(Quantity.parse(memory).value) if memory else 0.0
            return dev.gpu, used / self.gpus[dev.gpu].memory
        return dev.gpu, dev.held

    def mig_fraction(self, profile: str) -> float:
        """Share of a GPU's memory slices a MIG profile takes (on the first GPU that offers it)."""
        for g in self.gpus:
            if profile in g.mig_profiles and g.memory_slices:
                return g.mig_profiles[profile] / g.memory_slices
        return 1.0

    def mig_profiles(self) -> list[tuple[str, int]]:
        """Every MIG profile some GPU offers (name, memory slices), smallest first; ``+me`` variants left out."""
        seen: dict[str, int] = {}
        for g in self.gpus:
            for name, size in g.mig_profiles.items():
                if "+" not in name:
                    seen.setdefault(name, size)
        return sorted(seen.items(), key=lambda kv: (kv[1], kv[0]))


def parse_node_specs(items: list[str]) -> FakeGpuProfile:
    """``NAME=MODEL:COUNT[,MODEL:COUNT]`` per node (as ``partita sandbox --node``)."""
    nodes = []
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise SimulateError(f"--node {item!r}: write NAME=MODEL:COUNT[,MODEL:COUNT], e.g. node-a=H100-SXM5-80GB:8")
        try:
            nodes.append(profile_from_spec(spec, name).nodes[0].model_dump(by_alias=True, mode="json"))
        except ProfileError as e:
            raise SimulateError(f"--node {item!r}: {e}") from None
    try:
        return parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": nodes},
                             "--node")
    except ProfileError as e:
        raise SimulateError(str(e)) from None


def cluster_profile(node_specs: list[str], profile: Path | None, nodes: int | None, gpus: str | None) -> FakeGpuProfile:
    """The cluster from ``--node`` entries, a ``--profile`` file, or ``--nodes N --gpus MODEL:COUNT``
    (default 16 nodes of 8 H100)."""
    chosen = [n for n, v in (("--node", node_specs), ("--profile", profile), ("--nodes/--gpus", nodes or gpus)) if v]
    if len(chosen) > 1:
        raise SimulateError(f"use only one of --node, --profile and --nodes/--gpus (got {', '.join(chosen)})")
    if node_specs:
        return parse_node_specs(node_specs)
    if profile is not None:
        try:
            got = load_profile(profile)
        except ProfileError as e:
            raise SimulateError(str(e)) from None
        if any(n.name == "*" for n in got.nodes):
            raise SimulateError(f"{profile}: the simulator needs real node names; replace the \"*\" entry by named nodes")
        return got
    n = DEFAULT_NODES if nodes is None else nodes
    if n < 1:
        raise SimulateError(f"--nodes {n}: a cluster needs at least 1 node")
    width = len(str(n - 1))
    return parse_node_specs([f"node-{i:0{width}d}={gpus or DEFAULT_GPUS}" for i in range(n)])


def build_cluster(profile: FakeGpuProfile) -> Cluster:
    index = SliceIndex()
    nodes: list[Node] = []
    gpus: list[Gpu] = []
    devices: dict[tuple[str, str], Device] = {}
    spec = []
    for entry in profile.nodes:
        backend = open_backend("fake", profile=profile, node_name=entry.name)
        backend.init()
        inv = discover(backend, entry.name)
        slices = build_slices(inv)
        for s in slices:
            index.upsert(s)
        by_uuid = _add_gpus(inv, [m for m, _, _ in entry.gpu_list()], gpus)
        for s in slices:
            for d in s["spec"].get("devices") or []:
                devices[(s["spec"]["pool"]["name"], d["name"])] = _device(d, by_uuid, gpus)
        nodes.append(Node(entry.name, {"kubernetes.io/hostname": entry.name}))
        spec.append(f"{entry.name}=" + ",".join(f"{g.model}:{g.count}" for g in entry.gpus))
    if not gpus:
        raise SimulateError("the cluster has no GPUs; give each node at least one (NAME=MODEL:COUNT)")
    classes = {c["metadata"]["name"]: c for c in device_classes()}
    return Cluster(nodes, index, classes, gpus, devices, spec)


def _add_gpus(inv: Inventory, models: list[str], gpus: list[Gpu]) -> dict[str, Gpu]:
    by_uuid = {}
    for g, model in zip(inv.gpus, models):
        profiles = {p.name: p.memory_slices for p in g.mig_profiles}
        gpu = Gpu(len(gpus), inv.node_name, g.uuid, model, g.memory_bytes, g.memory_slices, profiles)
        gpus.append(gpu)
        by_uuid[g.uuid] = gpu
    return by_uuid


def _device(d: dict, by_uuid: dict[str, Gpu], gpus: list[Gpu]) -> Device:
    attrs = d.get("attributes") or {}
    kind = attrs[C.ATTR_TYPE]["string"]
    uuid = (attrs.get(C.ATTR_PARENT_UUID) or attrs.get(C.ATTR_UUID))["string"]
    gpu = by_uuid[uuid]
    if kind == C.DEVICE_TYPE_MIG:
        slices = sum(1 for cs in d.get("consumesCounters") or [] for name in cs["counters"]
                     if name.startswith("memory-slice-"))
        held = slices / gpu.memory_slices if gpu.memory_slices else 1.0
    else:
        held = 1.0
    return Device(gpu.index, kind, held)
