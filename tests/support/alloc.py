"""Compact builders for allocator inputs (API JSON dicts), for tests."""

from __future__ import annotations

from controller.allocator import AllocatedState, Allocator, Features, Node, SliceIndex

NODE = Node("node-1", {"region": "region-1", "planet": "earth"})


def dev(name, attrs=None, cap=None, **extra):
    d = {"name": name}
    if attrs:
        d["attributes"] = {k: (v if isinstance(v, dict) else
                               {"bool": v} if isinstance(v, bool) else
                               {"int": v} if isinstance(v, int) else {"string": v}) for k, v in attrs.items()}
    if cap:
        d["capacity"] = {k: (v if isinstance(v, dict) else {"value": v}) for k, v in cap.items()}
    d.update(extra)
    return d


def slice_(name, devices=None, node="node-1", pool="pool-1", driver="driver-a", gen=1, count=1, counters=None, **spec):
    s = {"driver": driver, "pool": {"name": pool, "generation": gen, "resourceSliceCount": count}}
    if node:
        s["nodeName"] = node
    if counters is not None:
        s["sharedCounters"] = [{"name": k, "counters": {c: {"value": v} for c, v in cs.items()}}
                               for k, cs in counters.items()]
    else:
        s["devices"] = devices or []
    s.update(spec)
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": name}, "spec": s}


def cls(name="class-a", expr='device.driver == "driver-a"', config=None):
    spec = {"selectors": [{"cel": {"expression": expr}}]} if expr else {}
    if config:
        spec["config"] = config
    return {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": name}, "spec": spec}


def req(name="req-0", cls_name="class-a", count=None, mode=None, selectors=(), **extra):
    e = {"deviceClassName": cls_name}
    if count is not None:
        e["count"] = count
    if mode:
        e["allocationMode"] = mode
    if selectors:
        e["selectors"] = [{"cel": {"expression": s}} for s in selectors]
    e.update(extra)
    return {"name": name, "exactly": e}


def sub(name, cls_name="class-a", count=None, **extra):
    r = req(name, cls_name, count, **extra)
    return {"name": name, **r["exactly"]}


def first(name, *subs):
    return {"name": name, "firstAvailable": list(subs)}


def claim(name, *requests, constraints=None, config=None, ns="default"):
    devices = {"requests": list(requests)}
    if constraints:
        devices["constraints"] = constraints
    if config:
        devices["config"] = config
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": ns}, "spec": {"devices": devices}}


def allocate(claims, slices, classes=None, *, features=Features(), state=None, node=NODE, strategy="first-fit"):
    idx = SliceIndex.from_slices(slices)
    classes = {c["metadata"]["name"]: c for c in (classes if classes is not None else [cls()])}
    return Allocator(features, strategy).allocate(node, claims, idx, classes, state or AllocatedState())


def devices_of(result):
    return [(r["request"], r["pool"], r["device"]) for r in result["devices"]["results"]]
