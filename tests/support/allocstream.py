"""Random allocate/release streams through the allocator, checked by :mod:`tests.support.validity`.

Used by the property test (hypothesis, fixed seed, short streams) and by hack/bench_allocator.py (long
streams). A stream is a list of operations: ``("alloc", kind, arg)`` or ``("release", index)``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from controller.allocator import AllocatedState, AllocationError, Allocator, Node, SliceIndex
from driver.api import constants as C
from driver.api.deviceclasses import device_classes
from driver.api.quantity import Quantity
from driver.inventory import discover
from driver.nvml import open_backend
from driver.nvml.profile import parse_profile
from driver.slices import build_slices

from .validity import Req, any_single_fit, check

DRIVER = C.DEFAULT_DRIVER_NAME
MAINTENANCE = {"key": "example.com/maintenance", "value": "true", "effect": "NoSchedule"}
A = f"device.attributes['{DRIVER}']"

#: whole-GPU selectors: (CEL, the same in Python)
WHOLE = {
    "any": (None, lambda d: True),
    "h100": (f"{A}.productName.contains('H100')", lambda d: "H100" in d["productName"]),
    "big": (f"device.capacity['{DRIVER}'].memory.compareTo(quantity('70Gi')) >= 0",
            lambda d: d["capacity.memory"] >= Quantity.parse("70Gi")),
    "l4": (f"{A}.productName == 'NVIDIA L4'", lambda d: d["productName"] == "NVIDIA L4"),
}
MIG_PROFILES = ("1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb")
KINDS = ("whole", "mig", "shared", "pair")


def cluster_slices() -> tuple[list[dict], list[Node]]:
    """Two nodes: 2xH100 (dynamic MIG) and A100-80GB (MIG mode on) + L4. One H100's whole device
    carries an untolerated maintenance taint (its MIG and shared devices stay usable)."""
    profile = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile", "nodes": [
        {"name": "node-a", "gpus": [{"model": "H100-SXM5-80GB", "count": 2}]},
        {"name": "node-b", "gpus": [{"model": "A100-SXM4-80GB", "count": 1, "migEnabled": True},
                                    {"model": "L4", "count": 1}]}]})
    slices = []
    for n in profile.nodes:
        backend = open_backend("fake", profile=profile, node_name=n.name)
        backend.init()
        slices += build_slices(discover(backend, n.name))
    tainted = False
    for s in slices:
        for d in s["spec"].get("devices") or []:
            if not tainted and d["attributes"]["type"]["string"] == "gpu" and s["spec"]["nodeName"] == "node-a":
                d["taints"] = [*d.get("taints", []), MAINTENANCE]
                tainted = True
    return slices, [Node("node-a", {"kubernetes.io/hostname": "node-a"}), Node("node-b", {"kubernetes.io/hostname": "node-b"})]


def make_claim(kind: str, arg: object) -> tuple[dict, list[Req]]:
    tol = [C.managed_toleration()]
    if kind == "whole":
        cel, pred = WHOLE[str(arg)]
        spec = {"deviceClassName": C.DEVICE_CLASS_GPU, "count": 1, "tolerations": tol}
        if cel:
            spec["selectors"] = [{"cel": {"expression": cel}}]
        requests = [{"name": "gpu", "exactly": spec}]
        reqs = [Req("gpu", C.DEVICE_TYPE_GPU, pred, tolerations=tol)]
        constraints = []
    elif kind == "mig":
        spec = {"deviceClassName": C.DEVICE_CLASS_MIG, "count": 1, "tolerations": tol,
                "selectors": [{"cel": {"expression": f"{A}.migProfile == '{arg}'"}}]}
        requests = [{"name": "mig", "exactly": spec}]
        reqs = [Req("mig", C.DEVICE_TYPE_MIG, lambda d, p=arg: d.get("migProfile") == p, tolerations=tol)]
        constraints = []
    elif kind == "shared":
        mem = f"{arg}Gi"
        spec = {"deviceClassName": C.DEVICE_CLASS_SHARED, "count": 1, "tolerations": tol,
                "capacity": {"requests": {"memory": mem}}}
        requests = [{"name": "nb", "exactly": spec}]
        reqs = [Req("nb", C.DEVICE_TYPE_SHARED, memory=Quantity.parse(mem), tolerations=tol)]
        constraints = []
    elif kind == "pair":
        spec = {"deviceClassName": C.DEVICE_CLASS_GPU, "count": 2, "tolerations": tol}
        requests = [{"name": "gpus", "exactly": spec}]
        reqs = [Req("gpus", C.DEVICE_TYPE_GPU, count=2, tolerations=tol, match_attribute="productName")]
        constraints = [{"requests": ["gpus"], "matchAttribute": f"{DRIVER}/productName"}]
    else:
        raise ValueError(kind)
    devices: dict = {"requests": requests}
    if constraints:
        devices["constraints"] = constraints
    claim = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
             "metadata": {"name": f"{kind}-{uuid.uuid4().hex[:6]}", "namespace": "default", "uid": str(uuid.uuid4())},
             "spec": {"devices": devices}}
    return claim, reqs


@dataclass
class StreamResult:
    problems: list[str] = field(default_factory=list)
    allocated: int = 0
    unsatisfiable: int = 0
    released: int = 0


def run_stream(ops: list[tuple], strategy: str, slices: list[dict] | None = None,
               nodes: list[Node] | None = None, check_every: int = 1) -> StreamResult:
    if slices is None or nodes is None:
        slices, nodes = cluster_slices()
    index = SliceIndex.from_slices(slices)
    classes = {c["metadata"]["name"]: c for c in device_classes(DRIVER)}
    allocator = Allocator(strategy=strategy)
    state = AllocatedState()
    live: list[tuple[list[Req], dict]] = []
    out = StreamResult()
    for step, op in enumerate(ops):
        if op[0] == "release":
            if live:
                reqs, alloc = live.pop(op[1] % len(live))
                state.remove_allocation(alloc)
                out.released += 1
            continue
        _, kind, arg = op
        claim, reqs = make_claim(kind, arg)
        try:
            choice = allocator.allocate_on_nodes(nodes, [claim], index, classes, state)
        except AllocationError as e:
            out.problems.append(f"step {step}: {kind} {arg}: allocator error {e}")
            continue
        if choice.node is None:
            out.unsatisfiable += 1
            if kind != "pair":
                fit = any_single_fit(slices, DRIVER, live, reqs[0])
                if fit is not None:
                    out.problems.append(f"step {step}: {kind} {arg} was called unsatisfiable but {fit} fits")
            continue
        alloc = choice.results[0]
        live.append((reqs, alloc))
        state.add_allocation(alloc)
        out.allocated += 1
        if step % check_every == 0 or step == len(ops) - 1:
            problems = check(slices, DRIVER, live)
            if problems:
                out.problems += [f"step {step} ({kind} {arg}): {p}" for p in problems]
                break
    return out
