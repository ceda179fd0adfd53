"""Reading ResourceClaims for Prepare: the kubelet sends only namespace, name and uid.

Both come from outside the plugin, so they are checked before anything uses them: the names the
kubelet sends must be valid Kubernetes names (:func:`check_claim_ref`) before they go into an API path,
and the claim read back must have the shape the API server guarantees (:func:`check_claim_shape`)
before Prepare reads its allocation, so a malformed object fails with the field it lacks instead of an
internal error.
"""

from __future__ import annotations

from typing import Any, Protocol

from driver.api.kube import InvalidName, Kube, KubeError, KubeNotFound, check_name, check_namespace, claim_path
from driver.api.messages import brief
from driver.api.nodeselector import NodeFacts
from driver.plugin.admission import check_allocated_here
from driver.plugin.claimref import ClaimRef, PrepareError, check_request


class ClaimGone(PrepareError):
    """The claim the kubelet names no longer exists on the API server (deleted)."""


class ClaimSource(Protocol):
    async def get(self, ref: ClaimRef) -> dict:
        """The claim; :class:`ClaimGone` when it does not exist, :class:`PrepareError` when it cannot be read."""
        ...


def check_claim_ref(ref: ClaimRef) -> None:
    """The kubelet's namespace, name and uid of a claim: non-empty, and valid Kubernetes names."""
    if not ref.uid:
        raise PrepareError(f"the kubelet sent a claim with an empty uid (namespace {brief(ref.namespace)}, name "
                           f"{brief(ref.name)}); this is a kubelet bug or a misbehaving client — upgrade the kubelet "
                           "or report it")
    try:
        check_namespace(ref.namespace, "namespace")
        check_name(ref.name, "name")
    except InvalidName as e:
        raise PrepareError(f"the kubelet sent claim uid {brief(ref.uid)} with {e}; no ResourceClaim can have that "
                           "name, so it was not read from the API server — this is a kubelet bug or a misbehaving "
                           "client") from None


class KubeClaimSource:
    """GET the claim from the API server (before Prepare takes its lock)."""

    def __init__(self, kube: Kube):
        self._kube = kube

    async def get(self, ref: ClaimRef) -> dict:
        check_claim_ref(ref)
        try:
            return await self._kube.get(claim_path(ref.namespace, ref.name))
        except KubeNotFound:
            raise ClaimGone(f"claim {ref} (uid {ref.uid}) does not exist on the API server; it was deleted — "
                            "the kubelet stops asking once the pod is gone") from None
        except KubeError as e:
            raise PrepareError(f"reading claim {ref} from the API server failed: {e}; the kubelet retries") from None
        except OSError as e:
            raise PrepareError(f"reading claim {ref}: the API server is unreachable ({e}); the kubelet retries") from None


def our_results(ref: ClaimRef, claim: dict, driver_name: str, node: NodeFacts) -> list[dict]:
    """The results of ``driver_name`` in the claim's allocation, once the claim is the one the kubelet named
    (same uid), allocated, for this node (its nodeSelector; every result in this node's pool)."""
    check_request(ref)
    md = claim.get("metadata") or {}
    if md.get("uid") != ref.uid:
        raise PrepareError(f"claim {ref} has uid {md.get('uid')} but the kubelet asked for uid {ref.uid}: the "
                           "claim was deleted and re-created; the kubelet retries with the new claim")
    allocation = (claim.get("status") or {}).get("allocation")
    if not allocation:
        raise PrepareError(f"claim {ref} (uid {ref.uid}) has no status.allocation: it is not allocated; "
                           "the kubelet retries once the scheduler or the Partita controller allocates it")
    check_allocated_here(str(ref), allocation, node)
    results = [r for r in (allocation.get("devices") or {}).get("results") or [] if r.get("driver") == driver_name]
    for r in results:
        if r.get("pool") != node.name:
            raise PrepareError(f"claim {ref}: status.allocation.devices.results device {r.get('device')} is in "
                               f"pool {r.get('pool')}, which is another node's; only pool {node.name} "
                               "is prepared here")
    return results


# -- the shape of a claim read back -------------------------------------------------------------
_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}


class _Shape:
    def __init__(self, ref: ClaimRef):
        self.ref = ref

    def fail(self, path: str, problem: str) -> None:
        raise PrepareError(f"claim {self.ref}: {path} {problem}; the API server never returns such a claim — it was "
                           "written by something other than the API server, or the allocation is corrupt: delete "
                           "the claim so it is allocated again")

    def get(self, obj: dict, key: str, path: str, typ: type, *, required: bool = False,
            non_empty: bool = False) -> Any:
        where = f"{path}.{key}" if path else key
        if key not in obj or obj[key] is None:
            if required:
                self.fail(where, "is missing")
            return None
        value = obj[key]
        if not isinstance(value, typ):
            self.fail(where, f"must be {_TYPES[typ]}, not {brief(value)}")
        if non_empty and not value:
            self.fail(where, "is empty")
        return value

    def items(self, obj: dict, key: str, path: str, typ: type) -> list[tuple[str, Any]]:
        """``(path[i], item)`` of a list field whose items must be of ``typ``."""
        out = []
        where = f"{path}.{key}" if path else key
        for i, item in enumerate(self.get(obj, key, path, list) or []):
            if not isinstance(item, typ):
                self.fail(f"{where}[{i}]", f"must be {_TYPES[typ]}, not {brief(item)}")
            out.append((f"{where}[{i}]", item))
        return out


def check_claim_shape(ref: ClaimRef, claim: object) -> None:
    """Every field Prepare reads has the type the resource.k8s.io/v1 API gives it; the results' request,
    driver, pool and device are set. Raises :class:`PrepareError` naming the field."""
    s = _Shape(ref)
    if not isinstance(claim, dict):
        s.fail("the object", f"must be a ResourceClaim object, not {brief(claim)}")
    s.get(claim, "metadata", "", dict, required=True)
    status = s.get(claim, "status", "", dict) or {}
    allocation = s.get(status, "allocation", "status", dict)
    if not allocation:
        return                       # not allocated: Prepare says so
    sel = s.get(allocation, "nodeSelector", "status.allocation", dict)
    if sel:
        for tpath, term in s.items(sel, "nodeSelectorTerms", "status.allocation.nodeSelector", dict):
            for key in ("matchFields", "matchExpressions"):
                for rpath, req in s.items(term, key, tpath, dict):
                    s.get(req, "key", rpath, str, required=True)
                    s.get(req, "operator", rpath, str, required=True)
                    s.items(req, "values", rpath, str)
    devices = s.get(allocation, "devices", "status.allocation", dict) or {}
    for rpath, r in s.items(devices, "results", "status.allocation.devices", dict):
        for key in ("request", "driver", "pool", "device"):
            s.get(r, key, rpath, str, required=True, non_empty=True)
        s.get(r, "shareID", rpath, str)
        s.get(r, "adminAccess", rpath, bool)
        for cap in s.get(r, "consumedCapacity", rpath, dict) or {}:
            s.get(r["consumedCapacity"], cap, f"{rpath}.consumedCapacity", str, required=True)
    for cpath, c in s.items(devices, "config", "status.allocation.devices", dict):
        s.get(c, "source", cpath, str, required=True)
        s.items(c, "requests", cpath, str)
        opaque = s.get(c, "opaque", cpath, dict)
        if opaque is not None:
            s.get(opaque, "driver", f"{cpath}.opaque", str, required=True)
