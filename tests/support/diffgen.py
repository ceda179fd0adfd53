"""Random allocator cases for the differential test against upstream's allocator (``draalloc``).

A case is a conformance fixture's ``input`` plus ``features`` (the format of controller/allocator/conformance.py), as plain
JSON: what ``draalloc batch`` reads and what :func:`controller.allocator.conformance.run_fixture` runs
through Partita's allocator. :func:`case` draws one from a ``random.Random``; the same seed gives the
same case. Two kinds of clusters:

* **real**: the slices Partita's driver publishes (driver/slices.py on a fake inventory: whole GPUs,
  every MIG placement with counters, shared devices with consumable capacity, the managed taint) with
  Partita's DeviceClasses, and claims as users write them;
* **synthetic**: small pools built to reach every branch of the allocator: counters, consumable
  capacity and request policies, shares, CEL on attributes/capacity/semver (runtime errors included),
  matchAttribute/distinctAttribute, firstAvailable, taints and tolerations, admin access, node
  selectors, per-device node selection, incomplete and outdated pools, invalid pools, configs, several
  claims, devices already allocated.

Inputs are what the API server would store: ``allocationMode`` and ``count`` are set (defaulted), and
fields of a disabled feature gate are only rarely generated (the API server drops them; the rare ones
check the allocator's own "feature is disabled" errors where upstream has them).
"""

from __future__ import annotations

import copy
import json
import random
from functools import lru_cache
from typing import Any

NODE = {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1", "zone": "z1", "tier": "gold"}}
DRIVERS = ("driver-a", "driver-b")
#: every feature Partita implements (DRAListTypeAttributes is not; it is never generated)
ALL_FEATURES = ("DRAAdminAccess", "DRAPrioritizedList", "DRAPartitionableDevices", "DRADeviceTaints",
                "DRAConsumableCapacity", "DRADeviceBindingConditions")
#: fake inventories for "real" cases: (model, count, MIG mode on) per GPU kind; H100s expose dynamic MIG
REAL_PROFILES = (
    (("H100-SXM5-80GB", 1, False),),
    (("H100-SXM5-80GB", 2, False),),
    (("A100-SXM4-40GB", 1, True), ("L4", 1, False)),
    (("A100-SXM4-80GB", 1, False),),
    (("L4", 2, False),),
    (("H100-SXM5-80GB", 1, False), ("T4", 1, False)),
)


def _features(rng: random.Random) -> list[str]:
    on = [f for f in ("DRAAdminAccess", "DRAPrioritizedList", "DRAPartitionableDevices", "DRADeviceTaints")
          if rng.random() < 0.85]
    # Partita's controller runs with consumable capacity; without it (and without binding conditions)
    # kube-scheduler picks upstream's "stable" implementation, whose pool order is a Go map walk.
    if rng.random() < 0.85:
        on.append("DRAConsumableCapacity")
    if rng.random() < 0.08:
        on.append("DRADeviceBindingConditions")
    return on


class _Ctx:
    def __init__(self, rng: random.Random, features: list[str]):
        self.rng = rng
        self.f = set(features)

    def on(self, feature: str) -> bool:
        return feature in self.f

    def gated(self, feature: str, p: float) -> bool:
        """Generate a field of ``feature`` with probability p; when the feature is off, rarely."""
        return self.rng.random() < (p if feature in self.f else p * 0.05)


# -- synthetic clusters -----------------------------------------------------------------------------
_MODELS = ("a", "b", "c")
_QTY = ("1Gi", "2Gi", "4Gi", "8Gi", "16Gi", "1500Mi", "3Gi")


def _attrs(c: _Ctx, driver: str) -> dict:
    r = c.rng
    a: dict[str, Any] = {}
    if r.random() < 0.85:
        a["model"] = {"string": r.choice(_MODELS)}
    if r.random() < 0.7:
        a["numa"] = {"int": r.randint(0, 2)}
    if r.random() < 0.5:
        a["fast"] = {"bool": r.random() < 0.5}
    if r.random() < 0.5:
        a["ver"] = {"version": r.choice(("1.0.0", "1.2.0", "1.10.3", "2.0.0-rc.1", "2.1.0"))}
    if r.random() < 0.2:
        # the same identifier qualified with the driver's own domain, or another domain
        # the driver's own domain written out (the API server rejects it beside the short name), or another domain
        if r.random() < 0.5:
            a[f"{driver}/model"] = a.pop("model", {"string": r.choice(_MODELS)})
        else:
            a["example.com/model"] = {"string": r.choice(_MODELS)}
    return a


def _taints(c: _Ctx) -> list[dict]:
    r = c.rng
    out = []
    for _ in range(r.choice((1, 1, 2))):
        t = {"key": r.choice(("k1", "k2")), "effect": r.choice(("NoSchedule", "NoExecute", "None"))}
        if r.random() < 0.6:
            t["value"] = r.choice(("v1", "v2"))
        out.append(t)
    return out


def _capacity(c: _Ctx, multi: bool) -> dict:
    r = c.rng
    cap: dict[str, Any] = {}
    if r.random() < 0.8 or multi:
        mem: dict[str, Any] = {"value": r.choice(("4Gi", "8Gi", "16Gi"))}
        if multi and c.on("DRAConsumableCapacity") and r.random() < 0.7:
            kind = r.random()
            if kind < 0.4:
                mem["requestPolicy"] = {"default": "1Gi", "validRange": {"min": "1Gi", "step": "1Gi",
                                                                         **({"max": "8Gi"} if r.random() < 0.5 else {})}}
            elif kind < 0.7:
                mem["requestPolicy"] = {"default": "2Gi", "validValues": ["1Gi", "2Gi", "4Gi"]}
            else:
                mem["requestPolicy"] = {"default": "1Gi", "validRange": {"min": "512Mi"}}
        cap["memory"] = mem
    if r.random() < 0.4:
        cap["cores"] = {"value": str(r.choice((4, 8, 16)))}
    return cap


def _synthetic_slices(c: _Ctx) -> tuple[list[dict], list[dict]]:
    """(slices, devices as (driver, pool, device, multi, consumes) for the allocated state)."""
    r = c.rng
    slices: list[dict] = []
    devs: list[tuple[str, str, str, bool]] = []
    npools = r.choice((1, 1, 2, 2, 3))
    for p in range(npools):
        driver = DRIVERS[0] if r.random() < 0.7 else DRIVERS[1]
        pool = f"pool-{p}"
        gen = r.choice((1, 1, 2))
        partitionable = c.gated("DRAPartitionableDevices", 0.35)
        per_device = partitionable and r.random() < 0.15
        nslices = r.choice((1, 1, 2))
        counter_sets: dict[str, dict[str, str]] = {}
        if partitionable:
            for k in range(r.choice((1, 2))):
                counter_sets[f"cs{k}"] = {"mem": r.choice(("8Gi", "12Gi", "16Gi")), **({"sm": "4"} if r.random() < 0.5 else {})}
        device_slices = nslices
        total = device_slices + (1 if counter_sets else 0)
        declared = total + (1 if r.random() < 0.04 else 0)          # incomplete: a slice is missing
        where = _where(c)
        names_used: list[str] = []
        for si in range(device_slices):
            devices = []
            for d in range(r.randint(1, 5)):
                name = f"d{si}{d}"
                if r.random() < 0.005 and names_used:
                    name = r.choice(names_used)                  # duplicate name: an invalid pool
                names_used.append(name)
                multi = c.gated("DRAConsumableCapacity", 0.25)
                dv: dict[str, Any] = {"name": name}
                attrs = _attrs(c, driver)
                if attrs:
                    dv["attributes"] = attrs
                cap = _capacity(c, multi)
                if cap:
                    dv["capacity"] = cap
                if multi:
                    dv["allowMultipleAllocations"] = True
                if counter_sets and r.random() < 0.8:
                    cs = r.choice(sorted(counter_sets))
                    counters = {k: {"value": r.choice(("2Gi", "4Gi", "8Gi")) if k == "mem" else r.choice(("1", "2"))}
                                for k in counter_sets[cs] if r.random() < 0.9}
                    if counters:
                        dv["consumesCounters"] = [{"counterSet": cs, "counters": counters}]
                if c.gated("DRADeviceTaints", 0.12):
                    dv["taints"] = _taints(c)
                if c.gated("DRADeviceBindingConditions", 0.3):
                    dv["bindingConditions"] = ["ready"]
                    dv["bindingFailureConditions"] = ["failed"]
                    dv["bindsToNode"] = r.random() < 0.5
                if per_device:
                    dv.update(_where(c, per_device=True))
                devices.append(dv)
                devs.append((driver, pool, name, multi))
            spec: dict[str, Any] = {"driver": driver, "pool": {"name": pool, "generation": gen,
                                                              "resourceSliceCount": declared}}
            if per_device:
                spec["perDeviceNodeSelection"] = True
            else:
                spec.update(where)
            spec["devices"] = devices
            slices.append(_slice(f"{pool}-{driver}-s{si}", spec))
        if counter_sets:
            spec = {"driver": driver, "pool": {"name": pool, "generation": gen, "resourceSliceCount": declared},
                    **(where if not per_device else {"nodeName": NODE["name"]}),
                    "sharedCounters": [{"name": k, "counters": {n: {"value": v} for n, v in cs.items()}}
                                       for k, cs in sorted(counter_sets.items())]}
            slices.append(_slice(f"{pool}-{driver}-counters", spec))
        if r.random() < 0.1:
            # an outdated slice of an older generation (ignored), or of a newer one for another node
            older = gen - 1 if gen > 1 else None
            if older is not None:
                spec = {"driver": driver, "pool": {"name": pool, "generation": older, "resourceSliceCount": 1},
                        "nodeName": NODE["name"], "devices": [{"name": "old0"}]}
                slices.append(_slice(f"{pool}-{driver}-old", spec))
    r.shuffle(slices)
    return slices, devs


def _where(c: _Ctx, per_device: bool = False) -> dict:
    r = c.rng
    x = r.random()
    if x < 0.6:
        return {"nodeName": NODE["name"] if r.random() < 0.96 else "node-2"}
    if x < 0.75:
        return {"allNodes": True}
    key, values = r.choice((("zone", ["z1"]), ("zone", ["z2"]), ("tier", ["gold", "silver"])))
    op = r.choice(("In", "In", "NotIn"))
    term: dict[str, Any] = {"matchExpressions": [{"key": key, "operator": op, "values": values}]}
    if r.random() < 0.2:
        term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [NODE["name"]]}]}
    return {"nodeSelector": {"nodeSelectorTerms": [term]}}


def _slice(name: str, spec: dict) -> dict:
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": name}, "spec": spec}


def _class(name: str, selectors: list[str], config: list | None = None) -> dict:
    spec: dict[str, Any] = {}
    if selectors:
        spec["selectors"] = [{"cel": {"expression": s}} for s in selectors]
    if config:
        spec["config"] = config
    return {"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass", "metadata": {"name": name}, "spec": spec}


def _opaque(driver: str, tag: str) -> dict:
    return {"opaque": {"driver": driver, "parameters": {"tag": tag}}}


def _synthetic_classes(c: _Ctx) -> list[dict]:
    r = c.rng
    out = [_class("class-a", ['device.driver == "driver-a"'],
                  [_opaque("driver-a", "from-class")] if r.random() < 0.3 else None),
           _class("class-b", ['device.driver == "driver-b"']),
           _class("class-any", [])]
    if r.random() < 0.12:
        # a class selector that errors at runtime on devices without the attribute
        out.append(_class("class-err", ['device.attributes["driver-a"].numa >= 1']))
    if r.random() < 0.3:
        out.append(_class("class-model-a", ['device.driver == "driver-a"',
                                            '"model" in device.attributes["driver-a"] && '
                                            'device.attributes["driver-a"].model == "a"']))
    return out


# Domains are also named by a computed key, ``device.attributes[device.driver]``: for a device without attributes in
# that domain it is an empty map upstream (the differential test found Partita's CEL raising "no such key" there;
# fixed in controller/allocator/cel.py).
_SELECTORS = (
    'device.attributes["driver-a"].model == "a"',
    '"model" in device.attributes["driver-a"] && device.attributes["driver-a"].model != "c"',
    '"numa" in device.attributes["driver-a"] && device.attributes["driver-a"].numa == 0',
    'device.attributes["driver-a"].numa > 0',                                       # runtime error if absent
    '"memory" in device.capacity["driver-a"] && '
    'device.capacity["driver-a"].memory.compareTo(quantity("8Gi")) >= 0',
    '"memory" in device.capacity["driver-a"] && '
    'device.capacity["driver-a"].memory.isLessThan(quantity("10Gi"))',
    'device.capacity["driver-a"].memory.isGreaterThan(quantity("4Gi"))',           # runtime error if absent
    '"ver" in device.attributes["driver-a"] && '
    'device.attributes["driver-a"].ver.isGreaterThan(semver("1.2.0"))',
    '"ver" in device.attributes["driver-a"] && device.attributes["driver-a"].ver.major() == 1',
    'device.attributes["driver-a"].ver.compareTo(semver("2.0.0")) < 0',             # runtime error if absent
    '"fast" in device.attributes["driver-a"] && device.attributes["driver-a"].fast',
    '"model" in device.attributes["example.com"]',
    'device.driver.startsWith("driver-")',
    'device.allowMultipleAllocations == false',
    'device.attributes["driver-a"].model.matches("^[ab]$")',                         # runtime error if absent
    '"ver" in device.attributes[device.driver] && device.attributes[device.driver].ver.major() == 1',
    'device.attributes[device.driver].model == "a"',                                # runtime error if absent
    '"memory" in device.capacity[device.driver]',
)


def _spec(c: _Ctx, classes: list[dict], admin_ok: bool) -> dict:
    r = c.rng
    names = [x["metadata"]["name"] for x in classes]
    cls = r.choice(names + ["class-a", "class-any"] + (["class-missing"] if r.random() < 0.02 else []))
    e: dict[str, Any] = {"deviceClassName": cls}
    if r.random() < 0.12:
        e["allocationMode"] = "All"
    else:
        e["allocationMode"] = "ExactCount"
        e["count"] = r.choice((1, 1, 1, 1, 2, 2, 3))
    if r.random() < 0.35:
        e["selectors"] = [{"cel": {"expression": s}} for s in r.sample(_SELECTORS, r.choice((1, 1, 2)))]
    if c.gated("DRADeviceTaints", 0.3):
        tol: dict[str, Any] = {"key": r.choice(("k1", "k2")), "operator": r.choice(("Equal", "Exists"))}
        if r.random() < 0.1:
            tol = {"operator": "Exists"}                                     # tolerates every taint
        if tol["operator"] == "Equal":
            tol["value"] = r.choice(("v1", "v2"))
        if r.random() < 0.5:
            tol["effect"] = r.choice(("NoSchedule", "NoExecute"))
        e["tolerations"] = [tol]
    if admin_ok and c.gated("DRAAdminAccess", 0.08):
        e["adminAccess"] = True
    if c.on("DRAConsumableCapacity") and r.random() < 0.25 or c.on("DRADeviceBindingConditions") and r.random() < 0.03:
        e["capacity"] = {"requests": {"memory": r.choice(_QTY)}}
    return e


def _claims(c: _Ctx, classes: list[dict]) -> list[dict]:
    r = c.rng
    out = []
    for ci in range(r.choice((1, 1, 2, 2, 3))):
        requests = []
        for ri in range(r.choice((1, 1, 2, 3))):
            name = f"r{ri}"
            if c.gated("DRAPrioritizedList", 0.25):
                subs = []
                for si in range(r.choice((1, 2, 3))):
                    s = _spec(c, classes, admin_ok=False)
                    subs.append({"name": f"s{si}", **s})
                requests.append({"name": name, "firstAvailable": subs})
            else:
                requests.append({"name": name, "exactly": _spec(c, classes, admin_ok=True)})
        devices: dict[str, Any] = {"requests": requests}
        constraints = []
        if len(requests) > 1 or any(x.get("exactly", {}).get("count", 0) > 1 or
                                    x.get("exactly", {}).get("allocationMode") == "All" for x in requests):
            if r.random() < 0.45:
                kind = "distinctAttribute" if c.on("DRAConsumableCapacity") and r.random() < 0.35 else "matchAttribute"
                attr = r.choice(("driver-a/model", "driver-a/numa", "driver-b/model", "example.com/model", "driver-a/ver"))
                con: dict[str, Any] = {kind: attr}
                if r.random() < 0.4:
                    names = [x["name"] for x in requests]
                    if any("firstAvailable" in x for x in requests) and r.random() < 0.5:
                        x = next(x for x in requests if "firstAvailable" in x)
                        names.append(f"{x['name']}/{x['firstAvailable'][0]['name']}")
                    con["requests"] = r.sample(names, r.randint(1, len(names)))
                constraints.append(con)
        if constraints:
            devices["constraints"] = constraints
        if r.random() < 0.25:
            names = [x["name"] for x in requests] + [f"{x['name']}/{s['name']}" for x in requests
                                                      for s in x.get("firstAvailable") or []]
            cfgs = []
            for k in range(r.choice((1, 1, 2))):
                cfg: dict[str, Any] = _opaque(r.choice(DRIVERS), f"claim-{ci}-{k}")
                if r.random() < 0.6:
                    cfg["requests"] = r.sample(names, r.randint(1, min(2, len(names))))
                cfgs.append(cfg)
            devices["config"] = cfgs
        out.append({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                    "metadata": {"name": f"claim-{ci}", "namespace": "default", "uid": f"uid-{ci}"},
                    "spec": {"devices": devices}})
    return out


def _state(c: _Ctx, devs: list[tuple[str, str, str, bool]], inp: dict) -> None:
    r = c.rng
    if not devs or r.random() < 0.5:
        return
    for driver, pool, name, multi in r.sample(devs, min(len(devs), r.randint(1, 3))):
        if multi and c.on("DRAConsumableCapacity"):
            inp.setdefault("allocatedShares", []).append(
                {"driver": driver, "pool": pool, "device": name, "shareID": f"00000000-0000-0000-0000-00000000000{r.randint(0, 9)}"})
            if r.random() < 0.8:
                inp.setdefault("aggregatedCapacity", []).append(
                    {"driver": driver, "pool": pool, "device": name, "capacity": {"memory": r.choice(("1Gi", "2Gi", "4Gi"))}})
        else:
            inp.setdefault("allocatedDevices", []).append({"driver": driver, "pool": pool, "device": name})


# -- real clusters (Partita's own slices) -----------------------------------------------------------
@lru_cache(maxsize=None)
def _real_template(profile: tuple, controller_mode: bool, partitionable: bool, consumable: bool) -> str:
    from driver.inventory import discover
    from driver.nvml import open_backend
    from driver.nvml.profile import parse_profile
    from driver.slices import SliceFeatures, build_slices

    gpus = [{"model": m, "count": n, **({"migEnabled": True} if mig else {})} for m, n, mig in profile]
    prof = parse_profile({"apiVersion": "gpu.partita.dev/v1alpha1", "kind": "FakeGpuProfile",
                          "nodes": [{"name": NODE["name"], "gpus": gpus}]})
    backend = open_backend("fake", profile=prof, node_name=NODE["name"])
    backend.init()
    return json.dumps(build_slices(discover(backend, NODE["name"]), features=SliceFeatures(
        taints=controller_mode, partitionable=partitionable, consumable_capacity=consumable)))


@lru_cache(maxsize=None)
def _real_classes() -> str:
    from driver.api.deviceclasses import device_classes

    return json.dumps(device_classes())


_REAL_SELECTORS = (
    "device.capacity['gpu.partita.dev'].memory.compareTo(quantity('40Gi')) >= 0",
    "device.attributes['gpu.partita.dev'].productName.lowerAscii().contains('h100')",
    "'migProfile' in device.attributes['gpu.partita.dev'] && "
    "device.attributes['gpu.partita.dev'].migProfile == '1g.10gb'",
    "device.attributes['gpu.partita.dev'].cudaComputeCapability.isGreaterThan(semver('8.0.0'))",
    "device.attributes['gpu.partita.dev'].migProfile.startsWith('2g')",            # runtime error on GPUs
    "device.attributes['gpu.partita.dev'].numaNode == 0",
)


def _real_case(c: _Ctx) -> dict:
    from driver.api import constants as C

    r = c.rng
    controller_mode = r.random() < 0.7
    # what the publisher detects the API server keeps (driver/slices.py SliceFeatures)
    slices = json.loads(_real_template(r.choice(REAL_PROFILES), controller_mode, c.on("DRAPartitionableDevices"),
                                       c.on("DRAConsumableCapacity")))
    classes = json.loads(_real_classes())
    names = [x["metadata"]["name"] for x in classes]
    present = {d["attributes"]["type"]["string"] for x in slices for d in x["spec"].get("devices") or []}
    usable = [n for n in names if n.split(".", 1)[0] in present] or names
    claims = []
    for ci in range(r.choice((1, 1, 2, 3))):
        requests = []
        for ri in range(r.choice((1, 1, 1, 2))):
            e: dict[str, Any] = {"deviceClassName": r.choice(usable if r.random() < 0.9 else names),
                                 "allocationMode": "ExactCount",
                                 "count": r.choice((1, 1, 2))}
            if r.random() < 0.05:
                e = {"deviceClassName": e["deviceClassName"], "allocationMode": "All"}
            if r.random() < 0.3:
                e["selectors"] = [{"cel": {"expression": r.choice(_REAL_SELECTORS)}}]
            if controller_mode and c.on("DRADeviceTaints") and r.random() < 0.95:
                e["tolerations"] = [C.managed_toleration()]
            if e["deviceClassName"] == C.DEVICE_CLASS_SHARED and c.on("DRAConsumableCapacity") and r.random() < 0.7:
                e["capacity"] = {"requests": {"memory": r.choice(("5Gi", "10Gi", "20Gi", "40Gi"))}}
            if c.gated("DRAPrioritizedList", 0.2):
                alt = {"deviceClassName": r.choice(names), "allocationMode": "ExactCount", "count": 1,
                       **({"tolerations": e["tolerations"]} if "tolerations" in e else {})}
                requests.append({"name": f"r{ri}", "firstAvailable": [{"name": "a", **e}, {"name": "b", **alt}]})
            else:
                requests.append({"name": f"r{ri}", "exactly": e})
        devices: dict[str, Any] = {"requests": requests}
        if len(requests) > 1 and r.random() < 0.3:
            kind = "distinctAttribute" if c.on("DRAConsumableCapacity") and r.random() < 0.5 else "matchAttribute"
            devices["constraints"] = [{kind: r.choice(("gpu.partita.dev/parentUUID", "gpu.partita.dev/productName",
                                                       "resource.kubernetes.io/pcieRoot"))}]
        claims.append({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                       "metadata": {"name": f"claim-{ci}", "namespace": "default", "uid": f"uid-{ci}"},
                       "spec": {"devices": devices}})
    inp: dict[str, Any] = {"node": copy.deepcopy(NODE), "deviceClasses": classes, "resourceSlices": slices,
                           "claims": claims}
    if r.random() < 0.4:
        devs = [(s["spec"]["driver"], s["spec"]["pool"]["name"], d["name"], bool(d.get("allowMultipleAllocations")))
                for s in slices for d in s["spec"].get("devices") or []]
        _state(c, devs, inp)
    return inp


def case(rng: random.Random) -> dict:
    """One random case: ``{"features": [...], "node": ..., "deviceClasses": ..., "resourceSlices": ...,
    "allocatedDevices"/"allocatedShares"/"aggregatedCapacity" (when any), "claims": ...}``."""
    features = _features(rng)
    c = _Ctx(rng, features)
    if rng.random() < 0.25:
        inp = _real_case(c)
    else:
        slices, devs = _synthetic_slices(c)
        classes = _synthetic_classes(c)
        inp = {"node": copy.deepcopy(NODE), "deviceClasses": classes, "resourceSlices": slices,
               "claims": _claims(c, classes)}
        _state(c, devs, inp)
    return {"features": features, **inp}


def cases(seed: int, n: int, start: int = 0):
    """Cases ``start .. start+n-1`` of a seed; case i is the same whatever ``start`` and ``n`` are."""
    for i in range(start, start + n):
        yield i, case(random.Random(f"{seed}:{i}"))
