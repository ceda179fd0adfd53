"""Reading ResourceClaims for Prepare: the kubelet sends only namespace, name and uid."""

from __future__ import annotations

from typing import Protocol

from driver.api.kube import Kube, KubeError, claim_path
from driver.plugin.prepare import ClaimRef, PrepareError


class ClaimSource(Protocol):
    async def get(self, ref: ClaimRef) -> dict: ...


class KubeClaimSource:
    """GET the claim from the API server (before Prepare takes its lock)."""

    def __init__(self, kube: Kube):
        self._kube = kube

    async def get(self, ref: ClaimRef) -> dict:
        try:
            return await self._kube.get(claim_path(ref.namespace, ref.name))
        except KubeError as e:
            if e.not_found:
                raise PrepareError(f"claim {ref} (uid {ref.uid}) does not exist on the API server; it was deleted — "
                                   "the kubelet stops asking once the pod is gone") from None
            raise PrepareError(f"reading claim {ref} from the API server failed: {e}; the kubelet retries") from None
        except OSError as e:
            raise PrepareError(f"reading claim {ref}: the API server is unreachable ({e}); the kubelet retries") from None
