#!/usr/bin/env python3
"""Benchmark: the capacity computation (controller/operator/capacity.py) at cluster scale.

Synthetic clusters of N nodes x 8 H100-SXM5-80GB with the driver's full device model (whole GPU, every MIG
placement with counters, shared device: 216 devices per node, built by driver/slices.py for one node and cloned
per node), one whole GPU allocated per node, and pending claims of the three kinds (20 whole, one MIG 3g.40gb,
one 10Gi share). Prints the time of one :func:`compute` per size: what the controller spends, in its
background thread, every ``capacity_refresh_seconds`` (15 s by default), and what ``partita status`` spends.

Usage: .venv/bin/python hack/bench_capacity.py [--nodes 10 100 500]   (about a minute on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.operator import capacity as cap  # noqa: E402
from driver.api import constants as C  # noqa: E402
from driver.api.deviceclasses import device_classes  # noqa: E402
from driver.inventory import discover  # noqa: E402
from driver.nvml import open_backend, profile_from_spec  # noqa: E402
from driver.slices import build_slices  # noqa: E402


def node_slices(n: int) -> list[dict]:
    backend = open_backend("fake", profile=profile_from_spec("H100-SXM5-80GB:8", "node-0"), node_name="node-0")
    backend.init()
    text = json.dumps(build_slices(discover(backend, "node-0")))
    return [s for i in range(n) for s in json.loads(text.replace('"node-0', f'"node-{i}'))]


def _claim(name: str, exactly: dict, allocation: dict | None = None) -> dict:
    c = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
         "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
         "spec": {"devices": {"requests": [{"name": "gpu", "exactly": exactly}]}}}
    if allocation:
        c["status"] = {"allocation": allocation}
    return c


def workload(slices: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    gpu = next(d["name"] for s in slices for d in s["spec"].get("devices") or []
               if d["attributes"]["type"]["string"] == C.DEVICE_TYPE_GPU)
    claims = [_claim(f"a{i}", {"deviceClassName": C.DEVICE_CLASS_GPU}, {"devices": {"results": [
        {"request": "gpu", "driver": C.DEFAULT_DRIVER_NAME, "pool": f"node-{i}", "device": gpu}]}}) for i in range(n)]
    pending = [_claim(f"p{i}", {"deviceClassName": C.DEVICE_CLASS_GPU}) for i in range(20)]
    pending.append(_claim("mig", {"deviceClassName": C.DEVICE_CLASS_MIG, "selectors": [{"cel": {
        "expression": f"device.attributes['{C.DEFAULT_DRIVER_NAME}'].migProfile == '3g.40gb'"}}]}))
    pending.append(_claim("share", {"deviceClassName": C.DEVICE_CLASS_SHARED,
                                    "capacity": {"requests": {"memory": "10Gi"}}}))
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{c['metadata']['name']}",
                                                             "namespace": "default"},
             "spec": {"resourceClaims": [{"name": "gpu", "resourceClaimName": c["metadata"]["name"]}]},
             "status": {"phase": "Pending"}} for c in pending]
    return claims + pending, pods


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 500])
    args = p.parse_args()
    classes = {c["metadata"]["name"]: c for c in device_classes()}
    print(f"{'nodes':>6} {'devices':>8} {'compute s':>10}  pending by reason")
    for n in args.nodes:
        slices = node_slices(n)
        claims, pods = workload(slices, n)
        t = time.perf_counter()
        got = cap.compute(slices, claims, pods, classes)
        took = time.perf_counter() - t
        devices = sum(len(s["spec"].get("devices") or []) for s in slices)
        print(f"{n:>6} {devices:>8} {took:>10.2f}  {got.pending_by_reason()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
