"""kopf wiring only: watch pods, claims, slices, device classes and nodes, and feed the controller.

Handlers are ``on.event`` handlers in a registry of their own (several controllers can run in one
process, as in tests); they write nothing into the watched objects (no progress annotations, no status).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf

from driver.api.kube import Connection

from .controller import Controller

log = logging.getLogger(__name__)

WATCHED = (
    ("pod", "", "v1", "pods"),
    ("claim", "resource.k8s.io", "v1", "resourceclaims"),
    ("slice", "resource.k8s.io", "v1", "resourceslices"),
    ("deviceclass", "resource.k8s.io", "v1", "deviceclasses"),
    ("node", "", "v1", "nodes"),
    ("namespace", "", "v1", "namespaces"),      # labels, for pod affinity namespaceSelectors (nodefit)
)


def build_registry(controller: Controller, kube_api: str | None,
                   extra: tuple[tuple[str, str, str, str], ...] = (),
                   connection: Connection | None = None) -> kopf.OperatorRegistry:
    """``extra``: more (kind, group, version, plural) to watch, found by discovery (DeviceTaintRules);
    ``connection``: the one ``--kubeconfig``/``--context`` chose (driver.api.kube.Kube.connection)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
        if connection is not None:
            return kopf.ConnectionInfo(**dataclasses.asdict(connection))
        if kube_api:
            return kopf.ConnectionInfo(server=kube_api.rstrip("/"), insecure=True)
        return (kopf.login_with_service_account(settings=settings, **kwargs)
                or kopf.login_with_kubeconfig(settings=settings, **kwargs))

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.peering.standalone = True
        settings.scanning.disabled = True          # fixed resources; no CRD watch (the chart grants none)
        settings.posting.enabled = False          # the controller posts its own, deduplicated events
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="partita.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="partita.dev",
                                                                                 key="kopf-last-handled")
        settings.watching.server_timeout = 240
        settings.watching.client_timeout = 270
        settings.networking.request_timeout = 60

    for kind, group, version, plural in WATCHED + tuple(extra):
        def handler(event: dict, _kind: str = kind, **_: Any) -> None:
            etype = event.get("type") or "ADDED"       # None: the initial listing
            obj = event.get("object")
            if obj:
                controller.on_event(_kind, etype, dict(obj))

        kopf.on.event(group, version, plural, registry=registry, id=f"partita-{kind}")(handler)
    return registry
