"""An independent check of one fake-GPU node's plugin state (tests and hack/chaos_plugin.py).

It reads the plugin's files as raw JSON (never through the plugin's own models or code paths) and the
fake GPUs through NVML, and lists every violation of what a quiescent node must satisfy:

* the checkpoint parses, and every claim in it is ``Prepared`` (interrupted work was finished);
* it holds exactly the claims the caller expects prepared (when given);
* no orphaned MIG instance: every GPU instance on every GPU is recorded by exactly one prepared claim,
  with matching profile, placement, instance ids and MIG device UUID, and every recorded instance exists;
* no claim prepared twice: no device in two claims (shares excepted), no share id twice, no overlapping
  MIG placements;
* no stale CDI spec: every spec file of the driver belongs to a prepared claim, every prepared claim's spec
  exists, parses, names exactly its CDI devices and points MIG devices at their MIG UUID; no temp files;
* MIG mode is off on Hopper GPUs without MIG instances; GPUs without shares run compute mode Default and
  no MPS daemon; GPUs with MPS shares run exclusive-process compute mode and their daemon.

Devices recorded ``adminAccess: true`` (monitoring claims) hold nothing: they are left out of the rules
above, except that their CDI device is checked like any other.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from driver.nvml import open_backend
from driver.nvml.profile import FakeGpuProfile
from driver.plugin.mps_standin import CONTROL_SOCKET

CDI_PREFIX = "k8s.gpu.partita.dev-gpu_"
_RESETLESS = {"Hopper", "Blackwell"}


def _daemon_answers(control: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(control))
        s.sendall(b"get_server_list\n")
        return bool(s.recv(4096))
    except OSError:
        return False
    finally:
        s.close()


def running_mps_gpus(plugin_dir: Path) -> set[str]:
    """GPU UUIDs whose MPS stand-in answers on its control socket."""
    out = set()
    for marker in (plugin_dir / "mps").glob("*/gpu"):
        if _daemon_answers(marker.parent / CONTROL_SOCKET):   # the stand-in's, in the plugin-private dir
            out.add(marker.read_text().strip())
    return out


def check_node(*, plugin_dir: Path, cdi_dir: Path, profile: FakeGpuProfile, node_name: str,
               expected_uids: set[str] | None = None) -> list[str]:
    v: list[str] = []
    cp_path = plugin_dir / "checkpoint.json"
    claims: dict = {}
    if cp_path.exists():
        try:
            cp = json.loads(cp_path.read_bytes().decode("utf-8"))
            claims = cp.get("claims") or {}
        except ValueError as e:
            return [f"checkpoint {cp_path} does not parse: {e}"]
    for uid, c in claims.items():
        if c.get("state") != "Prepared":
            v.append(f"claim {uid} is left {c.get('state')!r} in the checkpoint")
    if expected_uids is not None and set(claims) != expected_uids:
        v.append(f"checkpoint claims differ from the expected prepared ones: extra "
                 f"{sorted(set(claims) - expected_uids)}, missing {sorted(expected_uids - set(claims))}")

    # -- devices held once --
    holders: dict[str, str] = {}
    shares: dict[str, str] = {}
    migs: dict[str, list[tuple[str, dict]]] = {}
    for uid, c in claims.items():
        for d in c.get("devices") or []:
            if d.get("adminAccess") is True:
                continue                 # admin access is no use: it holds no device, share or instance
            if d.get("shareID"):
                if d["shareID"] in shares:
                    v.append(f"share {d['shareID']} is prepared for claims {shares[d['shareID']]} and {uid}")
                shares[d["shareID"]] = uid
            elif d["device"] in holders:
                v.append(f"device {d['device']} is prepared for claims {holders[d['device']]} and {uid}")
            else:
                holders[d["device"]] = uid
            if d.get("mig"):
                migs.setdefault(d["mig"]["gpuUUID"], []).append((uid, d["mig"]))

    # -- GPUs --
    backend = open_backend("fake", profile=profile, node_name=node_name, state_dir=plugin_dir / "fake-nvml")
    backend.init()
    mps_running = running_mps_gpus(plugin_dir)
    for i in range(backend.device_count()):
        h = backend.device_by_index(i)
        info = backend.device_info(h)
        uuid = info.uuid
        recorded = migs.get(uuid, [])
        for a in range(len(recorded)):
            for b in range(a + 1, len(recorded)):
                (ua, ma), (ub, mb) = recorded[a], recorded[b]
                if ma["placementStart"] < mb["placementStart"] + mb["placementSize"] and \
                        mb["placementStart"] < ma["placementStart"] + ma["placementSize"]:
                    v.append(f"GPU {uuid}: MIG placements of claims {ua} and {ub} overlap")
        mig_capable = backend.model_of(h).mig is not None
        if mig_capable:
            mode = backend.mig_mode(h)
            instances = backend.gpu_instances(h) if mode.current else []
            devices = {(m.gpu_instance_id, m.compute_instance_id): m for m in backend.mig_devices(h)} if mode.current else {}
            for gi in instances:
                owners = [uid for uid, m in recorded if m.get("gpuInstanceID") == gi.id
                          and (m["placementStart"], m["placementSize"]) == (gi.placement.start, gi.placement.size)]
                if len(owners) != 1:
                    v.append(f"GPU {uuid}: GPU instance {gi.id} (profile {gi.profile_id} at {gi.placement.start}:"
                             f"{gi.placement.size}) is {'orphaned' if not owners else f'held by {owners}'}")
            for uid, m in recorded:
                dev = devices.get((m.get("gpuInstanceID"), m.get("computeInstanceID")))
                if dev is None or dev.uuid != m.get("uuid") or dev.profile_id != m["profileID"] or \
                        (dev.placement.start, dev.placement.size) != (m["placementStart"], m["placementSize"]):
                    v.append(f"GPU {uuid}: claim {uid} records MIG device {m.get('uuid')} (GI {m.get('gpuInstanceID')}"
                             f", CI {m.get('computeInstanceID')}) that does not exist as recorded")
            if info.architecture in _RESETLESS and mode.current and not instances:
                v.append(f"GPU {uuid}: MIG mode is left on with no MIG instance")
        else:
            if recorded:
                v.append(f"GPU {uuid} has no MIG but claims record MIG devices on it")
        shared_here = [(uid, d) for uid, c in claims.items() for d in c.get("devices") or []
                       if d["gpuUUID"] == uuid and d.get("adminAccess") is not True
                       and (d["type"] == "shared" or (d["type"] == "gpu" and d.get("config")))]
        mps_here = [uid for uid, d in shared_here
                    if ((d.get("config") or {}).get("sharing") or {}).get("strategy") == "MPS"]
        if not shared_here:
            if backend.compute_mode(h) != "Default":
                v.append(f"GPU {uuid}: no shares but compute mode {backend.compute_mode(h)}")
            if uuid in mps_running:
                v.append(f"GPU {uuid}: an MPS daemon runs with no share using it")
        if mps_here and uuid not in mps_running:
            v.append(f"GPU {uuid}: MPS shares of claims {sorted(set(mps_here))} but no MPS daemon runs")
        if mps_here and backend.compute_mode(h) != "ExclusiveProcess":
            v.append(f"GPU {uuid}: MPS shares of claims {sorted(set(mps_here))} but compute mode "
                     f"{backend.compute_mode(h)}")
    backend.shutdown()

    # -- CDI specs --
    files = sorted(cdi_dir.iterdir()) if cdi_dir.exists() else []
    for f in files:
        if f.name.startswith("."):
            v.append(f"temp file {f} left in the CDI directory")
    for f in plugin_dir.glob(".*.tmp"):
        v.append(f"temp file {f} left in the plugin directory")
    specs = {f.name for f in files if f.name.startswith(CDI_PREFIX)}
    wanted = {f"{CDI_PREFIX}{uid}.json" for uid in claims}
    for name in sorted(specs - wanted):
        v.append(f"stale CDI spec {cdi_dir / name}: no prepared claim")
    for uid, c in claims.items():
        path = cdi_dir / f"{CDI_PREFIX}{uid}.json"
        if not path.is_file():
            v.append(f"claim {uid} is prepared but its CDI spec {path} is missing")
            continue
        try:
            spec = json.loads(path.read_text())
        except ValueError as e:
            v.append(f"CDI spec {path} does not parse: {e}")
            continue
        by_name = {d["name"]: d for d in spec.get("devices") or []}
        want = {i.split("=", 1)[1] for d in c.get("devices") or [] for i in d["cdiDeviceIDs"][:1]}
        if set(by_name) != want:
            v.append(f"CDI spec {path} names devices {sorted(by_name)}, the claim {sorted(want)}")
        for d in c.get("devices") or []:
            if d.get("mig") and d["cdiDeviceIDs"]:
                env = by_name.get(d["cdiDeviceIDs"][0].split("=", 1)[1], {}).get("containerEdits", {}).get("env", [])
                if f"NVIDIA_VISIBLE_DEVICES={d['mig'].get('uuid')}" not in env:
                    v.append(f"CDI spec {path}: device {d['device']} does not point at MIG device {d['mig'].get('uuid')}")
    return v
