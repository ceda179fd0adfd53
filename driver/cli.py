"""Node-side commands: ``inventory`` (what this node has and would publish) and ``plugin`` (the
kubelet plugin). Run as ``partita <command>`` or ``python -m driver <command>``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Callable

import yaml

from driver import logfmt
from driver.api import constants as C
from driver.cliopts import add_output
from driver.inventory import Inventory, discover
from driver.nvml import NvmlError, ProfileError, load_profile, open_backend, profile_from_spec
from driver.slices import SliceFeatures, build_slices


def add_inventory_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--fake", metavar="MODEL:COUNT[,MODEL:COUNT]",
                     help="use fake GPUs of built-in models instead of NVML, e.g. H100-SXM5-80GB:8,L4:2")
    src.add_argument("--profile", metavar="FILE", help="use fake GPUs from a FakeGpuProfile file")
    p.add_argument("--node-name", default="node-1", help="node name for the pool and slice names (default node-1)")
    p.add_argument("--driver-name", default=C.DEFAULT_DRIVER_NAME, help="DRA driver name (default %(default)s)")
    p.add_argument("--allocation-mode", choices=C.ALLOCATION_MODES, default=C.ALLOCATION_MODE_CONTROLLER,
                   help="controller: devices carry Partita's taint; scheduler: kube-scheduler allocates")
    p.add_argument("--no-partitionable", action="store_true",
                   help="as on clusters without partitionable devices: no counters, static MIG only")
    p.add_argument("--no-consumable-capacity", action="store_true",
                   help="as on clusters without consumable capacity: no shared GPU devices")
    add_output(p, help_="table (default), wide (the table with architecture, PCIe root, device ID and minor, "
                        "and every device named), or the ResourceSlices as a Kubernetes List in yaml or json")


def _inventory(args: argparse.Namespace) -> Inventory:
    if args.fake or args.profile:
        profile = profile_from_spec(args.fake, args.node_name) if args.fake else \
            load_profile(args.profile, "--profile", "--fake MODEL:COUNT")
        backend = open_backend("fake", profile=profile, node_name=args.node_name)
    else:
        backend = open_backend("real")
    backend.init()
    try:
        return discover(backend, args.node_name)
    finally:
        backend.shutdown()


def _table(inv: Inventory, slices: list[dict], features: SliceFeatures, wide: bool = False) -> str:
    lines = [f"Node {inv.node_name}: {len(inv.gpus)} GPU(s), NVIDIA driver {inv.driver_version}, "
             f"CUDA {inv.cuda_driver_version} ({inv.backend} NVML)", ""]
    hdr = f"{'UUID':42} {'PRODUCT':26} {'MEMORY':>9} {'SMS':>4} {'CC':>4} {'PCI BUS':13} {'NUMA':>4} MIG"
    width = len(hdr)
    if wide:
        hdr += f"  {'ARCH':13} {'PCIE ROOT':11} {'DEVICE ID':11} MINOR"
    lines.append(hdr)
    for g in inv.gpus:
        mig = "on" if g.mig_enabled else ("off" if g.mig_capable else "-")
        if g.mig_pending != g.mig_enabled and g.mig_capable:
            mig += f" (pending {'on' if g.mig_pending else 'off'})"
        numa = "-" if g.numa_node is None else str(g.numa_node)
        health = "" if g.healthy else "  UNHEALTHY"
        row = (f"{g.uuid:42} {g.product_name[:26]:26} {g.memory_bytes / 2**30:8.1f}G {g.multiprocessors:>4} "
               f"{g.cuda_compute_capability:>4} {g.pci_bus_id:13} {numa:>4} {mig}")
        if wide:
            row = f"{row:{width}}  {g.architecture:13} {g.pcie_root or '-':11} {g.pci_device_id or '-':11} " \
                  f"{g.minor}"
        lines.append(row + health)
    devices = [d for s in slices for d in s["spec"].get("devices") or []]
    lines += ["", f"ResourceSlices: {len(slices)} (driver {slices[0]['spec']['driver']}, pool {inv.node_name}, "
              f"allocation mode {features.allocation_mode}), {len(devices)} device(s)"]
    by_type: dict[str, list[str]] = {}
    for d in devices:
        by_type.setdefault(d["attributes"][C.ATTR_TYPE]["string"], []).append(d["name"])
    for t, names in by_type.items():
        shown = ", ".join(names) if wide else \
            ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        lines.append(f"  {t:7} {shown}")
    return "\n".join(lines)


def run_inventory(args: argparse.Namespace) -> int:
    try:
        inv = _inventory(args)
    except (ProfileError, NvmlError) as e:
        print(f"partita inventory: {e}", file=sys.stderr)
        return 2
    features = SliceFeatures(taints=args.allocation_mode == C.ALLOCATION_MODE_CONTROLLER,
                             partitionable=not args.no_partitionable,
                             consumable_capacity=not args.no_consumable_capacity)
    slices = build_slices(inv, driver_name=args.driver_name, features=features)
    if args.output in ("table", "wide"):
        print(_table(inv, slices, features, wide=args.output == "wide"))
        return 0
    doc = {"apiVersion": "v1", "kind": "List", "items": slices}
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return 0


#: name -> (module, add_arguments attribute, run attribute, help); modules are imported only when
#: their command runs.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "inventory": ("driver.cli", "add_inventory_arguments", "run_inventory",
                  "print this node's GPUs and the ResourceSlices the driver would publish"),
    "plugin": ("driver.plugin.main", "add_arguments", "run", "run the kubelet plugin (DaemonSet container)"),
    "fake-inject": ("driver.fakeinject", "add_arguments", "run",
                    "inject a health event (XID, ECC, fallen off the bus, reset...) into fake GPUs"),
}


def _unavailable(message: str) -> Callable[[argparse.Namespace], int]:
    def run(_args: argparse.Namespace) -> int:
        print(f"partita: {message}", file=sys.stderr)
        return 2
    return run


def add_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, module: str, add: str,
                run: str, help_: str, load: bool) -> None:
    """A subcommand whose module is imported only when ``load`` (it is the command being run)."""
    p = sub.add_parser(name, help=help_, description=help_)
    if not load:
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        p.set_defaults(_run=_unavailable(f"'{name}' is not available in this installation ({module}: {e})"))
        return
    getattr(mod, add)(p)
    p.set_defaults(_run=getattr(mod, run))


def add_subcommands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", wanted: str | None) -> None:
    for name, (module, add, run, help_) in COMMANDS.items():
        add_command(sub, name, module, add, run, help_, load=name == wanted)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m driver", description="Partita node-side commands")
    add_subcommands(parser.add_subparsers(dest="command", required=True),
                    next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers or getattr(args, "log_format", "text") != "text":
        logfmt.configure(getattr(args, "log_format", "text"), logging.INFO)
    return int(args._run(args))
