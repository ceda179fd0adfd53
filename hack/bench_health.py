#!/usr/bin/env python3
"""Benchmark: time from an injected XID to the published health taint, and the slice writes of a flood.

The plugin runs as its own process on fake GPUs (``python -m driver plugin --nvml fake``), publishing to the
in-process API server emulator; events are appended to the events file the fake NVML follows, as
``partita fake-inject`` does.

* ``latency``: per round, an XID 79 (fallen off the bus) on the next GPU; the time until the API server
  stores a ResourceSlice whose device carries ``gpu.partita.dev/unhealthy=lost``. Between rounds the GPU
  is reset and the taint removed again (quiet period 0.5 s).
* ``flood``: ``--flood-rate`` XIDs a second for ``--flood-seconds`` on one GPU (63: degraded); how many times
  the pool's slices were written meanwhile (the publisher coalesces: one state change, one write).

Usage: .venv/bin/python hack/bench_health.py [--rounds 8] [--flood-rate 5000] [--flood-seconds 3] [--json]
Target (issue 13): XID -> published taint <= 2 s on the fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.sandbox.apiserver import ApiServer  # noqa: E402
from controller.sandbox.plugin import PluginProcess  # noqa: E402
from driver.api import constants as C  # noqa: E402
from driver.api import naming  # noqa: E402
from driver.nvml import profile_from_spec  # noqa: E402
from driver.nvml.fake import fake_gpu_uuid  # noqa: E402

NODE, DRIVER, GPUS = "bench-node", "gpu.partita.dev", 8


def _taint(server: ApiServer, device: str) -> str | None:
    for s in server.list("resourceslices"):
        for d in s["spec"].get("devices") or []:
            if d["name"] == device:
                return next((t["value"] for t in d.get("taints") or [] if t["key"] == C.HEALTH_TAINT_KEY), None)
    return None


async def _until(pred, timeout: float = 30.0) -> float:
    start = time.perf_counter()
    while not pred():
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the taint did not change within %.0fs" % timeout)
        await asyncio.sleep(0.002)
    return time.perf_counter() - start


def _append(path: Path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


async def bench(rounds: int, flood_rate: int, flood_seconds: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench-h-", dir="/tmp"))
    server = ApiServer()
    url = await server.start()
    server.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    profile = profile_from_spec(f"H100-SXM5-80GB:{GPUS}", NODE)
    os.environ.update({"HEALTH_QUIET_PERIOD": "0.5", "HEALTH_CHECK_INTERVAL": "0.2"})
    plugin = PluginProcess(profile, profile.nodes[0], root, url, DRIVER, "WARNING")
    try:
        plugin.start()
        await plugin.wait_ready()
        events = plugin.paths.plugin_dir(DRIVER) / "fake-nvml" / "events.jsonl"
        await _until(lambda: bool(server.list("resourceslices")))
        latencies, recoveries = [], []
        for r in range(rounds):
            gpu = r % GPUS
            device = naming.gpu_device_name(fake_gpu_uuid(NODE, gpu))
            _append(events, [json.dumps({"kind": "xid", "gpu": gpu, "xid": 79})])
            latencies.append(await _until(lambda: _taint(server, device) == "lost"))
            _append(events, [json.dumps({"kind": "reset", "gpu": gpu})])
            recoveries.append(await _until(lambda: _taint(server, device) is None))
        # flood: many XIDs on one GPU; count slice writes (pool generation bumps)
        device = naming.gpu_device_name(fake_gpu_uuid(NODE, 0))
        gen0 = max(s["spec"]["pool"]["generation"] for s in server.list("resourceslices"))
        line = json.dumps({"kind": "xid", "gpu": 0, "xid": 63})
        sent, start = 0, time.perf_counter()
        while time.perf_counter() - start < flood_seconds:
            batch = max(1, flood_rate // 50)
            _append(events, [line] * batch)
            sent += batch
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - start
        await _until(lambda: _taint(server, device) == "degraded")
        await asyncio.sleep(1.0)
        gen1 = max(s["spec"]["pool"]["generation"] for s in server.list("resourceslices"))
        alive = plugin.alive()
    finally:
        plugin.stop()
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)
    lat = sorted(latencies)
    return {"rounds": rounds, "xid_to_taint_s": {"median": statistics.median(lat), "max": lat[-1], "min": lat[0]},
            "reset_to_untaint_s_incl_quiet_0.5s": {"median": statistics.median(recoveries), "max": max(recoveries)},
            "flood": {"events": sent, "rate_per_s": round(sent / elapsed), "slice_writes": gen1 - gen0,
                      "plugin_alive": alive}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--flood-rate", type=int, default=5000)
    p.add_argument("--flood-seconds", type=float, default=3.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = asyncio.run(bench(args.rounds, args.flood_rate, args.flood_seconds))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        x = out["xid_to_taint_s"]
        print(f"XID -> published taint ({out['rounds']} rounds): median {x['median']:.3f}s, min {x['min']:.3f}s, "
              f"max {x['max']:.3f}s (target <= 2 s)")
        r = out["reset_to_untaint_s_incl_quiet_0.5s"]
        print(f"reset -> taint removed (quiet period 0.5 s): median {r['median']:.3f}s, max {r['max']:.3f}s")
        f = out["flood"]
        print(f"flood: {f['events']} XIDs at {f['rate_per_s']}/s -> {f['slice_writes']} slice write(s); plugin "
              f"{'alive' if f['plugin_alive'] else 'DIED'}")
    return 0 if out["xid_to_taint_s"]["max"] <= 2.0 and out["flood"]["plugin_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
