"""Discovery documents (``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/<g>`` and ``/apis/<g>/<v>``)
as kopf and the official client expect them, ``namespaces`` included (without it kopf starts no watchers)."""

from __future__ import annotations

from .errors import ApiError
from .resources import RESOURCES

_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _group(group: str) -> dict:
    versions = sorted({r.version for r in RESOURCES if r.group == group}, key=lambda v: (v != "v1", v))
    return {"name": group, "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]}}


def discovery(path: str) -> dict | None:
    """The discovery document at ``path``; None when ``path`` is not a discovery path."""
    if path in ("/version",):
        return {"major": "1", "minor": "36", "gitVersion": "v1.36.0-partita-sandbox", "gitCommit": "sandbox",
                "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "none",
                "compiler": "none", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = sorted({r.group for r in RESOURCES if r.group})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(g) for g in groups]}
    if path.count("/") == 2 and path.startswith("/apis/"):
        group = path.split("/")[2]
        if any(r.group == group for r in RESOURCES):
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(group)}
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) == 2:
        group, version = "", parts[1]
    elif parts[0] == "apis" and len(parts) == 3:
        group, version = parts[1], parts[2]
    else:
        return None
    rs = [r for r in RESOURCES if r.group == group and r.version == version]
    if not rs:
        raise ApiError(404, "NotFound", f"no API group version {path}")
    out = []
    special = {"binding": ("Binding", ""), "eviction": ("Eviction", "policy")}     # create-only subresources
    for r in rs:
        out.append({"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced, "kind": r.kind,
                    "verbs": _VERBS})
        for s in r.subresources:
            kind, group_ = special.get(s, (r.kind, None))
            entry = {"name": f"{r.plural}/{s}", "singularName": "", "namespaced": r.namespaced, "kind": kind,
                     "verbs": ["create"] if s in special else ["get", "patch", "update"]}
            if group_:
                entry.update(group=group_, version="v1")
            out.append(entry)
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": out}
