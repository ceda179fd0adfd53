"""What the controller watches: pods, claims, slices, device classes, nodes and namespaces (and DeviceTaintRules
where the cluster serves them), each fed into the
controller's cache by an informer of its own (``informer.py``).

The handlers write nothing into the watched objects (no progress annotations, no status). Add a
resource here (and an ``_on_<kind>`` to the cache) to watch it.
"""

from __future__ import annotations

from driver.api.kube import Kube

from .controller import Controller
from .informer import Informers, Watched

WATCHED = (
    Watched("pod", "", "v1", "pods"),
    Watched("claim", "resource.k8s.io", "v1", "resourceclaims"),
    Watched("slice", "resource.k8s.io", "v1", "resourceslices"),
    Watched("deviceclass", "resource.k8s.io", "v1", "deviceclasses"),
    Watched("node", "", "v1", "nodes"),
    Watched("namespace", "", "v1", "namespaces"),      # labels, for pod affinity namespaceSelectors (nodefit)
)


def build_informers(controller: Controller, kube: Kube, extra: tuple[Watched, ...] = ()) -> Informers:
    """``extra``: more resources to watch, found by discovery (DeviceTaintRules)."""
    return Informers(kube, WATCHED + tuple(extra), controller.on_event, resync=controller.cfg.resync_seconds)
