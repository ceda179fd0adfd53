"""CDI (Container Device Interface) specs: one file per prepared claim, written completely or not at all.

The kubelet hands the runtime the CDI device IDs Prepare returns (``k8s.gpu.partita.dev/gpu=<name>``);
the runtime (containerd, CRI-O, podman) looks them up in the spec files of its CDI directories
(``/etc/cdi``, ``/var/run/cdi``). Partita's spec carries what is claim-specific (which GPU, MIG device
or share, the sharing settings); on real nodes the NVIDIA container toolkit's own spec (kind
``nvidia.com/gpu``) supplies device nodes and driver libraries, and Partita returns its device ID too
when that spec is installed (see :func:`toolkit_device_id`; which directories are searched is the plugin's
configuration, :mod:`driver.plugin.main`).

What a claim's spec holds is decided here (:func:`claim_spec`): one CDI device per prepared device, named
by :func:`device_name` from the claim UID, the device and its share; its environment says which GPU, MIG
device or share it is; the sharing set-up's extra edits (MPS pipe mount, limits) follow.

Specs use the lowest ``cdiVersion`` their content needs, as the CDI library's ``MinimumRequiredVersion``
does: 0.3.0, or 0.5.0 when a device name starts with a digit (claim UIDs often do); podman 4.3 reads
only up to 0.5.0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from driver.api import constants as C
from driver.plugin import durable
from driver.plugin.checkpoint import PreparedDevice

#: where the NVIDIA container toolkit's spec is installed (``nvidia-ctk cdi generate``), on real nodes
TOOLKIT_SPEC_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Mount(_Model):
    host_path: str = Field(alias="hostPath")
    container_path: str = Field(alias="containerPath")
    options: list[str] | None = None


class DeviceNode(_Model):
    path: str
    host_path: str | None = Field(default=None, alias="hostPath")
    permissions: str | None = None


class ContainerEdits(_Model):
    env: list[str] | None = None
    device_nodes: list[DeviceNode] | None = Field(default=None, alias="deviceNodes")
    mounts: list[Mount] | None = None


class CdiDevice(_Model):
    name: str
    container_edits: ContainerEdits = Field(alias="containerEdits")


class CdiSpec(_Model):
    cdi_version: str = Field(alias="cdiVersion")
    kind: str
    devices: list[CdiDevice]
    container_edits: ContainerEdits | None = Field(default=None, alias="containerEdits")

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


def minimum_version(devices: list[CdiDevice]) -> str:
    """Lowest cdiVersion for the fields Partita uses (env, deviceNodes, mounts): 0.3.0, or 0.5.0 when a
    device name starts with a digit."""
    return "0.5.0" if any(d.name[:1].isdigit() for d in devices) else "0.3.0"


def build_spec(driver_name: str, devices: list[CdiDevice], common_env: list[str] | None = None) -> CdiSpec:
    if not devices:
        raise ValueError("a CDI spec needs at least one device")
    return CdiSpec(cdiVersion=minimum_version(devices), kind=C.cdi_kind(driver_name), devices=devices,
                   containerEdits=ContainerEdits(env=common_env) if common_env else None)


def device_id(driver_name: str, device_name: str) -> str:
    return f"{C.cdi_kind(driver_name)}={device_name}"


def device_name(claim_uid: str, device: str, share_id: str | None = None) -> str:
    """The CDI device of one prepared device of a claim: unique on the node (claim UIDs are never reused; a
    claim's results name each device, or each share of a shared device, once)."""
    return f"{claim_uid}-{device}" + (f"-{share_id}" if share_id else "")


def device_env(d: PreparedDevice) -> list[str]:
    """What a container learns about the device it got."""
    visible = d.mig.uuid if d.mig is not None and d.mig.uuid else d.gpu_uuid
    env = [f"NVIDIA_VISIBLE_DEVICES={visible}", f"PARTITA_DEVICE={d.device}", f"PARTITA_DEVICE_TYPE={d.type}",
           f"PARTITA_GPU_UUID={d.gpu_uuid}"]
    if d.mig is not None and d.mig.uuid:
        env.append(f"PARTITA_MIG_UUID={d.mig.uuid}")
    if d.share_id:
        env.append(f"PARTITA_SHARE_ID={d.share_id}")
    if d.admin_access:
        env.append("PARTITA_ADMIN_ACCESS=true")
    return env


def claim_spec(driver_name: str, node_name: str, namespace: str, name: str, uid: str,
               devices: list[PreparedDevice]) -> CdiSpec:
    """The spec of one prepared claim: a CDI device per prepared device (:func:`device_name`), with
    :func:`device_env` and the device's extra edits (``PreparedDevice.edits``: a share's set-up), and the
    claim's own identity for every container."""
    cdi_devices = []
    for d in devices:
        extra = ContainerEdits.model_validate(d.edits or {})
        cdi_devices.append(CdiDevice(name=device_name(uid, d.device, d.share_id), containerEdits=ContainerEdits(
            env=device_env(d) + (extra.env or []), mounts=extra.mounts)))
    common = [f"PARTITA_CLAIM={namespace}/{name}", f"PARTITA_CLAIM_UID={uid}", f"PARTITA_NODE={node_name}"]
    return build_spec(driver_name, cdi_devices, common)


def spec_path(cdi_root: Path, driver_name: str, claim_uid: str) -> Path:
    """One file per claim, named after the claim UID, which is never reused."""
    return cdi_root / f"{C.cdi_vendor(driver_name)}-{C.CDI_CLASS}_{claim_uid}.json"


def write_spec(path: Path, spec: CdiSpec) -> None:
    """Completely or not at all (:func:`driver.plugin.durable.write_file`): a reader sees the old file, the
    new file, or nothing — never a partial one; a link planted at the path is replaced, never followed.
    Raises :class:`~driver.plugin.durable.DurableError` naming the file and its directory.

    Not fsynced: /var/run/cdi is a tmpfs that a power loss empties anyway, and every prepare of a
    prepared claim compares its spec byte for byte and rewrites it (:func:`spec_is_current`) before the
    kubelet starts containers, so a spec lost or torn by a power loss is repaired by the next prepare."""
    durable.write_file(path, spec_bytes(spec), what="CDI spec", mode=0o644, sync=False)


def spec_bytes(spec: CdiSpec) -> bytes:
    return json.dumps(spec.to_json()).encode()


def spec_is_current(path: Path, spec: CdiSpec) -> bool:
    """The file at ``path`` (not a link) holds exactly ``spec``."""
    try:
        return durable.read_file(path, what="CDI spec") == spec_bytes(spec)
    except durable.DurableError:
        return False


def remove_spec(path: Path) -> None:
    """Missing is fine; raises :class:`~driver.plugin.durable.DurableError` naming the directory otherwise."""
    durable.remove_file(path, what="CDI spec")


def ensure_dir(cdi_root: Path) -> None:
    """The CDI directory exists, is a real directory of the plugin's user and nobody else can write to it
    (container runtimes only read it)."""
    durable.private_dir(cdi_root, what="CDI directory", mode=0o755)


_TOOLKIT_KIND = re.compile(r'"?kind"?\s*:\s*"?nvidia\.com/gpu"?')


def toolkit_device_id(cdi_dirs: Iterable[Path], uuid: str) -> str | None:
    """``nvidia.com/gpu=<uuid>`` when the NVIDIA container toolkit's CDI spec (``nvidia-ctk cdi
    generate``) is installed in one of ``cdi_dirs`` and names the device by UUID; it supplies the device
    nodes and driver libraries that Partita's spec does not. None when no spec there names it (the plugin
    searches no directory on fake nodes)."""
    for d in cdi_dirs:
        try:
            files = sorted(d.iterdir())
        except OSError:
            continue
        for f in files:
            if f.suffix not in (".yaml", ".json") or not f.is_file():
                continue
            try:
                text = f.read_text()
            except OSError:
                continue
            if _TOOLKIT_KIND.search(text) and uuid in text:
                return f"nvidia.com/gpu={uuid}"
    return None
