"""What the controller watches: pods, claims, slices, device classes and nodes, each fed into the
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
)


def build_informers(controller: Controller, kube: Kube) -> Informers:
    return Informers(kube, WATCHED, controller.on_event, resync=controller.cfg.resync_seconds)
