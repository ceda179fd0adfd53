"""Builders for ResourceClaim objects as the API server returns them (tests only)."""

from __future__ import annotations

import uuid as uuidlib


def allocated_claim(name: str, devices: list[str], *, node: str = "node-a", driver: str = "gpu.partita.dev",
                    namespace: str = "default", uid: str | None = None, request: str = "gpu",
                    share_ids: dict[str, str] | None = None, config: list[dict] | None = None,
                    extra_results: list[dict] | None = None, share_memory: str = "10Gi",
                    admin_access: bool = False) -> dict:
    """``share_ids``: device -> shareID of results for shared devices; such results consume
    ``share_memory`` (upstream always fills consumedCapacity of a multi-allocatable device).
    ``admin_access``: the request asks ``exactly.adminAccess: true`` and every result carries
    ``adminAccess: true``, as the allocator writes them (the claim's namespace must be labelled
    ``resource.kubernetes.io/admin-access: "true"``, which the API server checks, not the plugin)."""
    results = []
    for d in devices:
        r = {"request": request, "driver": driver, "pool": node, "device": d}
        if share_ids and d in share_ids:
            r["shareID"] = share_ids[d]
            r["consumedCapacity"] = {"memory": share_memory}
        if admin_access:
            r["adminAccess"] = True
        results.append(r)
    results += extra_results or []
    alloc = {"devices": {"results": results},
             "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [
                 {"key": "metadata.name", "operator": "In", "values": [node]}]}]}}
    if config:
        alloc["devices"]["config"] = config
    exactly: dict = {"deviceClassName": "gpu.partita.dev"}
    if admin_access:
        exactly["adminAccess"] = True
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": namespace, "uid": uid or str(uuidlib.uuid4())},
            "spec": {"devices": {"requests": [{"name": request.split("/")[0],
                                               "exactly": exactly}]}},
            "status": {"allocation": alloc}}


class FakeClaims:
    """A ClaimSource serving claims from a dict (namespace/name -> claim)."""

    def __init__(self, *claims: dict):
        self.claims = {f"{c['metadata']['namespace']}/{c['metadata']['name']}": c for c in claims}

    def add(self, claim: dict) -> None:
        self.claims[f"{claim['metadata']['namespace']}/{claim['metadata']['name']}"] = claim

    async def get(self, ref):  # noqa: ANN001
        from driver.plugin.claims import ClaimGone

        c = self.claims.get(f"{ref.namespace}/{ref.name}")
        if c is None:
            raise ClaimGone(f"claim {ref} (uid {ref.uid}) does not exist on the API server")
        return c
