"""The kubelet-facing socket names of one plugin instance, and when per-instance names are safe.

Fixed names (``<registry>/<driver>-reg.sock``, ``<plugin dir>/dra.sock``) allow one instance per node: a
second one would unlink and re-bind the first one's sockets, and the first one removes them again when it
stops. For a DaemonSet rollout with surge (two pods on a node for a while) every instance names its sockets
with a per-instance uid, the pod's UID (k8s.io/dynamic-resource-allocation kubeletplugin ``RollingUpdate``):

* registration: ``<registry>/<driver>-<uid>-reg.sock``
* DRA service:  ``<plugin dir>/dra-<uid>.sock``

The kubelet (1.33 and newer, pkg/kubelet/cm/dra/plugin DRAPluginManager) keeps every registered instance of
a driver in registration order and calls the most recently registered one that is connected; an instance
that removes its registration socket is deregistered by its endpoint alone, so the old instance keeps
serving until it stops and its removal does not touch the new one. Older kubelets keep one plugin per
driver name and deregister by name, so per-instance names are unsafe there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from driver.errors import PartitaError

#: the first kubelet release whose DRA plugin manager supports several instances of one driver
MIN_KUBELET = (1, 33)
#: a pod UID (RFC 4122 text form) or any other name-safe token: it becomes part of two file names
_UID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.\d+)?(?:[-+].*)?$")


class InstanceUidError(PartitaError, ValueError):
    pass


@dataclass(frozen=True)
class SocketPaths:
    registration: Path
    dra: Path
    instance_uid: str = ""      # "" : the fixed names of a single instance


def check_instance_uid(uid: str, what: str = "--instance-uid (POD_UID)") -> str:
    if not _UID.match(uid):
        raise InstanceUidError(f"{what} {uid!r} is not a pod UID: lower-case letters, digits and '-', at most 64 "
                               f"characters (the DaemonSet sets it from the downward API, metadata.uid)")
    return uid


def socket_paths(driver_name: str, registry_dir: Path, plugin_dir: Path, instance_uid: str = "") -> SocketPaths:
    """The two sockets of an instance: fixed names without a uid, per-instance names with one."""
    part = f"-{check_instance_uid(instance_uid)}" if instance_uid else ""
    return SocketPaths(registration=registry_dir / f"{driver_name}{part}-reg.sock",
                       dra=plugin_dir / f"dra{part}.sock", instance_uid=instance_uid)


def registration_sockets(registry_dir: Path, driver_name: str) -> list[Path]:
    """Every registration socket of ``driver_name`` in the registry, fixed or per-instance name."""
    try:
        entries = list(registry_dir.iterdir())
    except FileNotFoundError:
        return []
    out = []
    for p in entries:
        n = p.name
        if n == f"{driver_name}-reg.sock" or (n.startswith(f"{driver_name}-") and n.endswith("-reg.sock")
                                              and _UID.match(n[len(driver_name) + 1:-len("-reg.sock")] or "-")):
            out.append(p)
    return sorted(out)


def parse_kubelet_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a Node's status.nodeInfo.kubeletVersion ("v1.33.2", "v1.34.0-gke.1"), else None."""
    m = _VERSION.match(version.strip()) if version else None
    return (int(m.group(1)), int(m.group(2))) if m else None


def kubelet_supports_instances(version: str) -> bool | None:
    """True for kubelet 1.33+, False for older, None when the version cannot be read."""
    parsed = parse_kubelet_version(version)
    return None if parsed is None else parsed >= MIN_KUBELET
