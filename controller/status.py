"""``partita status``: who uses which GPU, and how much (issue 14, item 5).

Per node and in total: GPUs by mode, memory allocated, usage where metrics are available, idle claims, and
pending pods with their reason. The capacity figures come from :func:`controller.operator.capacity.compute`,
the computation the controller's ``partita_capacity_*`` gauges come from, over the same API objects; usage
comes from the plugins' metrics (``--metrics-url``: a plugin's ``/metrics``, or Prometheus's
``/federate?match[]={__name__=~"partita_.*"}``, both Prometheus text format); idle claims from the claims'
``status.devices[].conditions`` (``type: Idle``) and ``partita_claim_idle``.

Works against a cluster (``--kubeconfig``, ``--context``, ``--kube-api``) and against the sandbox (its API
server URL with ``--kube-api``). ``--watch`` redraws every few seconds until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping, TextIO

from controller.operator import capacity as cap
from controller.operator.claims import allocated_node, key
from driver.api import constants as C
from driver.cliopts import add_cluster, add_output, connect_or, seconds, unreachable, where
from driver.errors import PartitaError

OUTPUTS = ("table", "wide", "yaml", "json")
IDLE_CONDITION = "Idle"
IDLE_METRIC = "partita_claim_idle"
HEALTH_METRIC = "partita_device_health"


class StatusError(PartitaError, RuntimeError):
    """The status could not be read; the message says what and how to fix it."""


# -- inputs ---------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The API objects the status is computed from."""
    slices: list[dict]
    claims: list[dict]
    pods: list[dict]
    classes: dict[str, dict]
    events: list[dict] = field(default_factory=list)


@dataclass
class DeviceUsage:
    node: str
    device: str
    mode: str
    claim: str                   # namespace/name
    pod: str                     # namespace/name
    utilization: float | None = None
    memory_used: float | None = None
    memory_allocated: float | None = None


@dataclass
class Usage:
    """What the metrics say: per claim device usage, idle claims, devices not healthy."""
    devices: dict[tuple[str, str, str], DeviceUsage] = field(default_factory=dict)   # (node, device, claim)
    idle: dict[str, dict] = field(default_factory=dict)                              # claim -> labels
    unhealthy: list[dict] = field(default_factory=list)                              # node, device, uuid, state
    sources: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_metrics(text: str, usage: Usage, source: str) -> None:
    """Add one scrape's partita_* series to ``usage``. A malformed text is reported in ``usage.errors``."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # noqa: BLE001 - the parser raises ValueError and others on bad input
        usage.errors.append(f"{source}: not Prometheus text format ({e}); give a plugin's /metrics or "
                            "Prometheus's /federate URL")
        return
    usage.sources.append(source)
    fields = {"partita_gpu_utilization_ratio": "utilization", "partita_gpu_memory_used_bytes": "memory_used",
              "partita_gpu_memory_allocated_bytes": "memory_allocated"}
    for fam in families:
        for s in fam.samples:
            lb = s.labels
            if s.name in fields:
                claim = f"{lb.get('claim_namespace', '')}/{lb.get('claim_name', '')}"
                k = (lb.get("node", ""), lb.get("device", ""), claim)
                du = usage.devices.setdefault(k, DeviceUsage(
                    k[0], k[1], lb.get("mode", ""), claim, f"{lb.get('pod_namespace', '')}/{lb.get('pod_name', '')}"))
                setattr(du, fields[s.name], float(s.value))
            elif s.name == IDLE_METRIC and s.value >= 1:
                usage.idle[f"{lb.get('claim_namespace', '')}/{lb.get('claim_name', '')}"] = dict(lb)
            elif s.name == HEALTH_METRIC and s.value >= 1 and lb.get("state", "healthy") != "healthy":
                usage.unhealthy.append({k: lb.get(k, "") for k in ("node", "device", "uuid", "state")})


async def scrape(urls: Iterable[str], timeout: float = 10.0) -> Usage:
    """Fetch each URL (errors are collected, never raised: the capacity is still shown)."""
    import aiohttp

    usage = Usage()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        for url in urls:
            try:
                async with http.get(url) as resp:
                    body = await resp.text()
                    if resp.status != 200:
                        usage.errors.append(f"{url}: HTTP {resp.status}; check the URL (a plugin's :PORT/metrics "
                                            "or Prometheus's /federate)")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                usage.errors.append(f"{url}: cannot fetch metrics ({e or type(e).__name__}); check --metrics-url")
                continue
            parse_metrics(body, usage, url)
    return usage


async def read_cluster(args: argparse.Namespace) -> Snapshot:
    from driver.api.kube import CLAIMS, DEVICE_CLASSES, PODS, SLICES, KubeError

    kube = await connect_or(args, StatusError)
    try:
        out = {}
        for name, path in (("slices", SLICES), ("claims", CLAIMS), ("pods", PODS), ("classes", DEVICE_CLASSES)):
            try:
                out[name] = (await kube.list(path)).get("items") or []
            except KubeError as e:
                raise StatusError(f"listing {path} on {where(args)} failed: {e}; the command needs list access "
                                  "to resourceslices, resourceclaims, deviceclasses and pods") from None
            except OSError as e:
                raise StatusError(unreachable(args, e)) from None
        try:
            events = (await kube.list("/api/v1/events", fieldSelector="involvedObject.kind=Pod")).get("items") or []
        except (KubeError, OSError):
            events = []       # no right to read Events: pending pods show their reason without the message
        return Snapshot(out["slices"], out["claims"], out["pods"],
                        {c["metadata"]["name"]: c for c in out["classes"] if (c.get("metadata") or {}).get("name")},
                        events)
    finally:
        await kube.close()


# -- the view --------------------------------------------------------------------------------------
def idle_claims(claims: Iterable[Mapping], usage: Usage, driver: str) -> list[dict]:
    """Claims reported idle: an ``Idle=True`` device condition in the claim's status, or ``partita_claim_idle``."""
    out: dict[str, dict] = {}
    by_key = {}
    for c in claims:
        k = key(c)
        by_key[k] = c
        for d in (c.get("status") or {}).get("devices") or []:
            if d.get("driver") != driver:
                continue
            for cond in d.get("conditions") or []:
                if cond.get("type") == IDLE_CONDITION and cond.get("status") == "True":
                    e = out.setdefault(k, {"claim": k, "devices": [], "since": cond.get("lastTransitionTime", ""),
                                           "reason": cond.get("reason", ""), "message": cond.get("message", "")})
                    e["devices"].append(d.get("device", ""))
    for k, lb in usage.idle.items():
        out.setdefault(k, {"claim": k, "devices": [], "since": "", "reason": "", "message": ""})
        out[k]["node"] = lb.get("node", "")
        out[k]["pod"] = f"{lb.get('pod_namespace', '')}/{lb.get('pod_name', '')}"
    for k, e in out.items():
        if not e["devices"]:
            e["devices"] = sorted({d.device for d in usage.devices.values() if d.claim == k})
        c = by_key.get(k) or {}
        reserved = [r for r in (c.get("status") or {}).get("reservedFor") or [] if r.get("resource") == "pods"]
        if "pod" not in e:
            ns = k.split("/", 1)[0]
            e["pod"] = ", ".join(f"{ns}/{r.get('name')}" for r in reserved) or "-"
        if "node" not in e:
            e["node"] = (allocated_node(c) or "-") if c else "-"
    return [out[k] for k in sorted(out)]


def _messages(events: Iterable[Mapping]) -> dict[str, str]:
    """Pod key -> the latest message of the controller's Events (``Partita*``) on it."""
    latest: dict[str, tuple[str, str]] = {}
    for e in events:
        if not str(e.get("reason", "")).startswith("Partita") or e.get("type") != "Warning":
            continue
        inv = e.get("involvedObject") or {}
        k = f"{inv.get('namespace', '')}/{inv.get('name', '')}"
        stamp = str(e.get("lastTimestamp") or e.get("eventTime") or "")
        if k not in latest or stamp >= latest[k][0]:
            latest[k] = (stamp, str(e.get("message", "")))
    return {k: v[1] for k, v in latest.items()}


def _scheduler_messages(pods: Iterable[Mapping]) -> dict[str, str]:
    """Pod key -> kube-scheduler's ``PodScheduled=False`` message (scheduler mode; the controller's Events win)."""
    out = {}
    for p in pods:
        for cond in (p.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("message"):
                out[key(p)] = str(cond["message"])
    return out


def build(snap: Snapshot, usage: Usage, driver: str = C.DEFAULT_DRIVER_NAME) -> dict:
    """The status as one JSON-able document (``-o json``; the tables render it)."""
    c = cap.compute(snap.slices, snap.claims, snap.pods, snap.classes, driver)
    msgs = {**_scheduler_messages(snap.pods), **_messages(snap.events)}
    nodes: dict[str, dict] = {}

    def mode_doc(mc: cap.ModeCapacity) -> dict:
        return {"gpus": {st: mc.gpus(st) for st in cap.STATES}, "memoryBytes": {st: mc.memory(st) for st in cap.STATES},
                "fragmented": {"gpus": mc.fragmented_gpus, "memoryBytes": mc.fragmented_memory}}

    def summary(gpus: list[cap.Gpu], per_mode: Mapping[str, cap.ModeCapacity], devs: list[DeviceUsage]) -> dict:
        utils = [d.utilization for d in devs if d.utilization is not None]
        used = [d.memory_used for d in devs if d.memory_used is not None]
        return {"gpus": len(gpus), "inUse": {m: per_mode[m].gpus_allocated for m in cap.MODES},
                "freeGpus": sum(1 for g in gpus if g.mode is None),
                "memoryBytes": {"total": sum(g.memory for g in gpus),
                                "allocated": sum(per_mode[m].memory_allocated for m in cap.MODES)},
                "modes": {m: mode_doc(per_mode[m]) for m in cap.MODES},
                "usage": {"devices": len(devs), "utilization": sum(utils) / len(utils) if utils else None,
                          "memoryUsedBytes": sum(used) if used else None}}

    devs_by_node: dict[str, list[DeviceUsage]] = {}
    for d in usage.devices.values():
        devs_by_node.setdefault(d.node, []).append(d)
    for node, per in c.nodes.items():
        nodes[node] = summary([g for g in c.gpus if g.node == node], per, devs_by_node.get(node, []))
    total = summary(c.gpus, c.total(), list(usage.devices.values()))
    return {
        "driver": driver,
        "nodes": nodes,
        "total": total,
        "pendingClaimsByReason": c.pending_by_reason(),
        "pendingPods": [{"pod": f"{p.namespace}/{p.name}", "reason": p.reason, "claims": p.claims,
                         "message": msgs.get(f"{p.namespace}/{p.name}", "")} for p in c.pending_pods],
        "idleClaims": idle_claims(snap.claims, usage, driver),
        "usage": [{"node": d.node, "device": d.device, "mode": d.mode, "claim": d.claim, "pod": d.pod,
                   "utilization": d.utilization, "memoryUsedBytes": d.memory_used,
                   "memoryAllocatedBytes": d.memory_allocated}
                  for d in sorted(usage.devices.values(), key=lambda d: (d.node, d.device, d.claim))],
        "unhealthyDevices": usage.unhealthy,
        "metrics": {"sources": usage.sources, "errors": usage.errors},
    }


# -- rendering -----------------------------------------------------------------------------------------
def _gib(n: float | int | None) -> str:
    if n is None:
        return "-"
    v = n / 2**30
    return f"{v:.0f}Gi" if abs(v - round(v)) < 0.05 else f"{v:.1f}Gi"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(doc: Mapping, wide: bool = False) -> str:
    head = ["NODE", "GPUS", "WHOLE", "MIG", "SHARED", "FREE", "MEMORY ALLOCATED", "UTILIZATION", "MEMORY USED"]
    if wide:
        head += ["FREE FOR WHOLE/MIG/SHARED", "FRAGMENTED WHOLE/MIG/SHARED"]
    rows = [head]
    for name, n in list(sorted(doc["nodes"].items())) + [("total", doc["total"])]:
        mem = n["memoryBytes"]
        pct = f" ({100 * mem['allocated'] / mem['total']:.0f}%)" if mem["total"] else ""
        row = [name, str(n["gpus"]), *(str(n["inUse"][m]) for m in cap.MODES), str(n["freeGpus"]),
               f"{_gib(mem['allocated'])} of {_gib(mem['total'])}{pct}", _pct(n["usage"]["utilization"]),
               _gib(n["usage"]["memoryUsedBytes"])]
        if wide:
            modes = n["modes"]
            row += ["/".join(f"{modes[m]['gpus']['free']}" for m in cap.MODES),
                    "/".join(f"{modes[m]['fragmented']['gpus']} ({_gib(modes[m]['fragmented']['memoryBytes'])})"
                             for m in cap.MODES)]
        rows.append(row)
    out = [_table(rows)]
    if not doc["total"]["gpus"]:
        out.append(f"No GPUs published by driver {doc['driver']}: is the Partita plugin running on the GPU nodes "
                   "(and --driver-name the chart's driverName)?")
    if wide and doc["usage"]:
        out += ["", "Usage:", _table([["CLAIM", "POD", "NODE", "DEVICE", "MODE", "UTILIZATION", "MEMORY USED",
                                       "MEMORY ALLOCATED"]] +
                                     [[u["claim"], u["pod"], u["node"], u["device"], u["mode"], _pct(u["utilization"]),
                                       _gib(u["memoryUsedBytes"]), _gib(u["memoryAllocatedBytes"])] for u in doc["usage"]])]
    out += ["", f"Idle claims ({len(doc['idleClaims'])}):"]
    if doc["idleClaims"]:
        cols = ["CLAIM", "POD", "NODE", "DEVICES", "SINCE"] + (["MESSAGE"] if wide else [])
        out.append(_table([cols] + [[i["claim"], i["pod"], i["node"], ", ".join(i["devices"]) or "-",
                                     i["since"] or "-"] + ([i["message"] or "-"] if wide else [])
                                    for i in doc["idleClaims"]]))
    out += ["", f"Pending pods ({len(doc['pendingPods'])}):"]
    if doc["pendingPods"]:
        cols = ["POD", "REASON", "CLAIMS"] + (["MESSAGE"] if wide else [])
        out.append(_table([cols] + [[p["pod"], p["reason"], ", ".join(p["claims"])] + ([p["message"] or "-"] if wide
                                                                                       else [])
                                    for p in doc["pendingPods"]]))
    if doc["unhealthyDevices"]:
        out += ["", "Devices not healthy:", _table([["NODE", "DEVICE", "UUID", "STATE"]] +
                                                  [[d["node"], d["device"], d["uuid"], d["state"]]
                                                   for d in doc["unhealthyDevices"]])]
    if not doc["metrics"]["sources"] and not doc["metrics"]["errors"]:
        out += ["", "Usage: no metrics (pass --metrics-url with a plugin's /metrics or Prometheus's /federate URL)"]
    for e in doc["metrics"]["errors"]:
        out.append(f"warning: {e}")
    return "\n".join(out)


# -- the command -----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_output(p, OUTPUTS, help_="table (default), wide (also free and fragmented capacity per mode, per claim "
                                 "usage, messages), or the same as one yaml or json document")
    p.add_argument("--driver-name", default=C.DEFAULT_DRIVER_NAME, help="the DRA driver whose GPUs are shown")
    p.add_argument("--metrics-url", action="append", default=[], metavar="URL",
                   help="where to read usage (repeat): a plugin's http://NODE:PORT/metrics, or Prometheus's "
                        "http://PROMETHEUS/federate?match[]={__name__=~\"partita_.*\"}")
    p.add_argument("--watch", nargs="?", type=seconds(0.1, 3600), const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C")
    add_cluster(p, namespace=False)


async def status_once(args: argparse.Namespace) -> dict:
    snap = await read_cluster(args)
    usage = await scrape(args.metrics_url) if args.metrics_url else Usage()
    return build(snap, usage, args.driver_name)


def _show(doc: dict, output: str, out: TextIO, *, clear: bool = False, one_line: bool = False) -> None:
    if output == "json":
        out.write(json.dumps(doc, indent=None if one_line else 2, sort_keys=True) + "\n")
    elif output == "yaml":
        import yaml

        out.write(("---\n" if one_line else "") + yaml.safe_dump(doc, sort_keys=True))
    else:
        if clear:
            out.write("\x1b[H\x1b[2J")
        out.write(render(doc, wide=output == "wide") + "\n")
    out.flush()


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.watch is None:
        _show(await status_once(args), args.output, out)
        return 0
    tty = out.isatty()
    while True:
        try:
            doc = await status_once(args)
        except StatusError as e:
            print(f"partita status: {e} (retrying)", file=sys.stderr)
        else:
            # json under --watch: one document per line, so a reader can take each refresh as it comes
            _show(doc, args.output, out, clear=tty, one_line=True)
        await asyncio.sleep(args.watch)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        return asyncio.run(_run(args, out))
    except StatusError as e:
        print(f"partita status: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


__all__ = ["Snapshot", "StatusError", "Usage", "add_arguments", "build", "parse_metrics", "render", "run", "scrape"]
