"""``partita fake-inject``: append a health event for fake GPUs to the file a fake-mode plugin follows
(``partita plugin --nvml fake --fake-events FILE``, default ``<fake state dir>/events.jsonl``).

    partita fake-inject --events /var/lib/kubelet/plugins/gpu.partita.dev/fake-nvml/events.jsonl \\
        --kind xid --gpu 0 --xid 79
    partita fake-inject --events FILE '{"kind": "reset", "gpu": 0}'

The event is checked before it is written (kind and fields; with --fake-profile and --node-name also that
the GPU exists): a refusal says what to fix and writes nothing. Kinds and their effects: docs/health.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path

from driver.nvml.profile import INJECTION_KINDS, InjectionError, ProfileError, load_profile, parse_injection


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("event", nargs="?", help="the event as a JSON object (instead of --kind and the other flags)")
    p.add_argument("--events", default=os.environ.get("FAKE_GPU_EVENTS"),
                   help="the events file the plugin follows (env FAKE_GPU_EVENTS)")
    p.add_argument("--fake-state-dir", help="the plugin's fake GPU state directory: the events file is "
                                            "<dir>/events.jsonl")
    p.add_argument("--kind", choices=INJECTION_KINDS)
    p.add_argument("--gpu", help="GPU index on the node or GPU UUID")
    p.add_argument("--mig", help="MIG device UUID (xid, ecc_dbe on one MIG instance)")
    p.add_argument("--xid", type=int)
    p.add_argument("--gpu-instance", type=int)
    p.add_argument("--compute-instance", type=int)
    p.add_argument("--clear", action="store_true", help="clear a *_pending / remapped_rows_failure condition")
    p.add_argument("--action", help="recovery_action: none, gpu_reset, node_reboot, drain_p2p, drain_and_reset")
    p.add_argument("--fake-profile", help="check the GPU against this FakeGpuProfile (with --node-name)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"))


def _event(args: argparse.Namespace) -> dict:
    if args.event:
        if args.kind:
            raise InjectionError("give the event either as JSON or with --kind and flags, not both")
        try:
            data = json.loads(args.event)
        except ValueError as e:
            raise InjectionError(f"the event is not JSON ({e}); e.g. '{{\"kind\": \"xid\", \"gpu\": 0, \"xid\": 79}}'") from None
        return data
    if not args.kind:
        raise InjectionError(f"no event: give --kind ({', '.join(INJECTION_KINDS)}) and --gpu, or the event as JSON")
    ev: dict = {"kind": args.kind}
    if args.gpu is not None:
        ev["gpu"] = int(args.gpu) if args.gpu.isdigit() else args.gpu
    for key, val in (("mig", args.mig), ("xid", args.xid), ("gpuInstance", args.gpu_instance),
                     ("computeInstance", args.compute_instance), ("action", args.action)):
        if val is not None:
            ev[key] = val
    if args.clear:
        ev["value"] = False
    return ev


def _check_device(inj, args: argparse.Namespace) -> None:  # noqa: ANN001
    profile = load_profile(args.fake_profile)
    if not args.node_name:
        raise InjectionError("--fake-profile needs --node-name (env NODE_NAME) to know the node's GPUs")
    from driver.nvml.fake import fake_gpu_uuid

    count = len(profile.node(args.node_name).gpu_list())
    uuids = {fake_gpu_uuid(args.node_name, i) for i in range(count)}
    if isinstance(inj.gpu, int) and not 0 <= inj.gpu < count:
        raise InjectionError(f"{inj.kind} event: node {args.node_name} has no GPU {inj.gpu} (GPUs 0..{count - 1})")
    if isinstance(inj.gpu, str) and inj.gpu not in uuids:
        raise InjectionError(f"{inj.kind} event: node {args.node_name} has no GPU {inj.gpu!r}")


def run(args: argparse.Namespace) -> int:
    path = Path(args.events) if args.events else Path(args.fake_state_dir) / "events.jsonl" if args.fake_state_dir \
        else None
    try:
        if path is None:
            raise InjectionError("where to: give --events FILE (the plugin's --fake-events) or --fake-state-dir DIR")
        inj = parse_injection(_event(args), "the event")
        if args.fake_profile:
            _check_device(inj, args)
    except (InjectionError, ProfileError) as e:
        print(f"partita fake-inject: {e}", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(inj.to_json() + "\n")
    print(f"injected {inj.to_json()} into {path}")
    return 0
