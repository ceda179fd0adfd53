"""Pod rules (kubernetes pkg/registry/core/pod/strategy.go) and the ``pods/binding`` subresource."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from .errors import ApiError, not_found
from .gates import FeatureGates
from .resources import resource_named
from .strategy import Strategy

if TYPE_CHECKING:
    from .store import Store


class PodStrategy(Strategy):
    def prepare_for_create(self, obj: dict, gates: FeatureGates) -> None:
        obj.setdefault("status", {}).setdefault("phase", "Pending")


def bind(store: "Store", ns: str, name: str, binding: dict) -> dict:
    """``pods/binding``: set ``spec.nodeName`` of a pending pod (409 when it is already bound)."""
    res = resource_named("pods")
    with store.lock:
        pod = store.peek(res, ns, name)
        if pod is None:
            raise not_found("pods", name)
        if (pod.get("spec") or {}).get("nodeName"):
            raise ApiError(409, "Conflict", f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"')
        target = (binding.get("target") or {}).get("name")
        if not target:
            raise ApiError(422, "Invalid", "Binding: target.name is required")
        new = copy.deepcopy(pod)
        new.setdefault("spec", {})["nodeName"] = target
        store.replace(res, ns, name, new, status=False, precondition=False)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
