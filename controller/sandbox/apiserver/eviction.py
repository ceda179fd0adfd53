"""The ``pods/eviction`` subresource (kubernetes pkg/registry/core/pod/storage/eviction.go): a policy/v1
Eviction deletes the pod unless a PodDisruptionBudget forbids it.

As upstream: 400 when the Eviction's name is not the pod's; 404 for a missing pod; a pod that is Pending,
Succeeded, Failed or being deleted is deleted without looking at budgets; more than one budget selecting the
pod answers 500; with one budget: 429 while its status.observedGeneration is behind its generation or its
status.disruptionsAllowed is 0 (a ``DisruptionBudget`` cause says which), 403 when it is negative; else the
budget's disruptionsAllowed is decremented and the pod recorded in status.disruptedPods, then the pod is
deleted: 201 with a Success Status. A not-ready pod is deleted without decrementing while the budget has
its desired healthy pods. ``deleteOptions.dryRun: [All]`` (or ``?dryRun=All``) changes nothing.

The emulator runs no disruption controller: a budget's status is what the test or the sandbox writes.
"""

from __future__ import annotations

import copy
import datetime
from typing import TYPE_CHECKING, Any

from controller.operator.nodefit import selector_matches

from .errors import ApiError, not_found
from .resources import resource_named

if TYPE_CHECKING:
    from .store import Store

MAX_DISRUPTED_PODS = 2000
_MESSAGE_429 = "Cannot evict pod as it would violate the pod's disruption budget."


def _too_many(cause: str, retry_after: int) -> ApiError:
    return ApiError(429, "TooManyRequests", _MESSAGE_429,
                    {"causes": [{"reason": "DisruptionBudget", "message": cause}], "retryAfterSeconds": retry_after})


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _budgets(store: "Store", pod: dict) -> list[dict]:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    out = []
    for pdb in store.items(resource_named("poddisruptionbudgets"), pod["metadata"].get("namespace", "")):
        selector = (pdb.get("spec") or {}).get("selector")
        # an empty or missing selector matches nothing (upstream: "it should match nothing, not everything")
        if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
            continue
        if selector_matches(selector, labels):
            out.append(pdb)
    return out


def evict(store: "Store", ns: str, name: str, body: Any, query: Any) -> tuple[int, dict]:
    """(HTTP status, Status object) of a POST to ``pods/NAME/eviction``."""
    body = body if isinstance(body, dict) else {}
    if body.get("kind") not in (None, "Eviction"):
        raise ApiError(400, "BadRequest", f"not a Eviction object: {body.get('kind')}")
    if (body.get("metadata") or {}).get("name") != name:
        raise ApiError(400, "BadRequest", "name in URL does not match name in Eviction object")
    options = body.get("deleteOptions") or {}
    dry_run = "All" in (options.get("dryRun") or []) or query.get("dryRun") == "All"
    preconditions = dict(options.get("preconditions") or {})
    pods = resource_named("pods")
    success = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}
    with store.lock:
        pod = store.peek(pods, ns, name)
        if pod is None:
            raise not_found("pods", name)
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if phase in ("Pending", "Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
            if not dry_run:
                store.delete(pods, ns, name, preconditions)
            return 201, success
        budgets = _budgets(store, pod)
        if len(budgets) > 1:
            return 500, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 500,
                         "message": "This pod has more than one PodDisruptionBudget, which the eviction subresource "
                                    "does not support."}
        if budgets:
            pdb = budgets[0]
            st = pdb.get("status") or {}
            desired, healthy = int(st.get("desiredHealthy") or 0), int(st.get("currentHealthy") or 0)
            if not (not _ready(pod) and healthy >= desired and desired > 0):
                pdb_name = pdb["metadata"]["name"]
                if int(st.get("observedGeneration") or 0) < int(pdb["metadata"].get("generation") or 0):
                    raise _too_many(f"The disruption budget {pdb_name} is still being processed by the server.", 10)
                allowed = int(st.get("disruptionsAllowed") or 0)
                if allowed < 0:
                    raise ApiError(403, "Forbidden", f'poddisruptionbudget.policy "{pdb_name}" is forbidden: pdb '
                                                     "disruptions allowed is negative")
                if len(st.get("disruptedPods") or {}) > MAX_DISRUPTED_PODS:
                    raise ApiError(403, "Forbidden", f'poddisruptionbudget.policy "{pdb_name}" is forbidden: '
                                                     "DisruptedPods map too big - too many evictions not confirmed "
                                                     "by PDB controller")
                if allowed == 0:
                    raise _too_many(f"The disruption budget {pdb_name} needs {desired} healthy pods and has "
                                    f"{healthy} currently", 0)
                if not dry_run:
                    new = copy.deepcopy(pdb)
                    status = new.setdefault("status", {})
                    status["disruptionsAllowed"] = allowed - 1
                    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    status.setdefault("disruptedPods", {})[name] = stamp
                    store.replace(resource_named("poddisruptionbudgets"), ns, pdb_name, new, status=True,
                                  precondition=False)
            elif not dry_run:
                preconditions.setdefault("resourceVersion", pod["metadata"].get("resourceVersion"))
        if not dry_run:
            store.delete(pods, ns, name, preconditions)
        return 201, success
