"""An in-process Kubernetes API server emulator for the sandbox and the integration tests.

Never used against a cluster. It serves the Kubernetes HTTP API on 127.0.0.1 (aiohttp, JSON) for the
resources Partita touches, with the semantics its clients rely on (docs/architecture.md §7):

* discovery (``/version``, ``/api``, ``/apis``, ``/api/v1``, ``/apis/<g>/<v>``) as kopf and the official
  client expect, including ``namespaces`` (without it kopf starts no watchers);
* server metadata: uid, creationTimestamp, generation (+1 on spec change), one global integer
  resourceVersion bumped on every write (deletes too), generateName, namespace from the URL;
* get, list (label selectors ``= == != in notin key !key``; field selectors on dotted paths ``= == !=``),
  create (409 AlreadyExists), PUT (409 Conflict on a stale ``metadata.resourceVersion``), PATCH
  (merge-patch; strategic-merge treated as merge-patch; JSON patch with 422 on a failed ``test``), delete
  (finalizers -> deletionTimestamp; the last finalizer removed -> gone; preconditions), deletecollection;
* status subresources (pods, nodes, resourceclaims): create drops status, main writes keep it, status
  writes change only status (metadata changes other than the resourceVersion precondition are ignored);
* ``pods/binding`` sets ``spec.nodeName`` (409 when already bound);
* ``pods/eviction`` (policy/v1 Eviction, ``eviction.py``): deletes the pod unless a PodDisruptionBudget
  forbids it (429), 404 for a missing pod; budgets' status is written by the test (no disruption controller);
* watch: JSON lines, initial ADDED events, resume from a bounded per-resource log, ``410 Expired`` as an
  ERROR event when too old, BOOKMARKs, ``timeoutSeconds``, selectors with ADDED/DELETED when an object
  enters or leaves them, ``sendInitialEvents`` with the ``k8s.io/initial-events-end`` bookmark;
* garbage collection of objects owned by a deleted Node or Pod (background);
* ResourceClaim status rules the product depends on: ``status.allocation`` is immutable once set,
  ``reservedFor`` needs an allocation, no new consumers while the claim is being deleted; ``status.devices``
  (KEP-4817) validated as upstream does and its entries for deallocated devices dropped;
* feature gates off: fields a real API server drops (device taints, partitionable devices, consumable
  capacity, claim device status) can be dropped the same way (``drop_features``).

Python API (for tests and the sandbox)::

    server = ApiServer(bookmark_interval=1.0)
    await server.start()            # in the running loop; or server.start_in_thread() from sync code
    server.url                      # "http://127.0.0.1:<port>"
    server.create(obj) / server.get(plural, name, ns) / server.list(plural, ns=None) /
    server.update(obj) / server.update_status(obj) / server.delete(plural, name, ns)   # thread-safe
    server.inject_fault(plural, verb, status, count=1, name=None, delay=0.0)  # next N matching requests
                                    # fail (status 0: only delayed by ``delay`` seconds, then served)
    server.drop_watches(plural=None) / server.compact(plural=None)  # end open watches / expire resumes (410)
    await server.wait_for(lambda s: ..., timeout=5)                 # no blind sleeps
    server.drop_features({"DRADeviceTaints"})                       # emulate a gate that is off
    await server.stop()             # or server.stop_in_thread()

Plurals name resources (``pods``, ``nodes``, ``resourceclaims``, ``resourceslices``, ...).

The package mirrors the real API server's split: ``store`` (objects, resourceVersion, watch log, garbage
collection), the per-resource strategies (``pods``, ``nodes``, ``claims``, ``slices`` on ``strategy``) and
``gates`` (feature gates that drop fields), ``http`` (routes, verbs, test hooks), ``discovery``, ``watch``,
``patch``, ``selectors``, ``faults``, ``resources`` (the REST mapping); ``server`` puts them together.
Others use only what ``__all__`` names.
"""

from .errors import ApiError
from .gates import FEATURES
from .resources import RESOURCES, Resource
from .server import ApiServer

__all__ = ["FEATURES", "RESOURCES", "ApiError", "ApiServer", "Resource"]
