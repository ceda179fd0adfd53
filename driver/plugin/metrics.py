"""Prometheus metrics of the kubelet plugin (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PREPARE_SECONDS = Histogram("partita_plugin_prepare_seconds", "NodePrepareResources duration", buckets=_BUCKETS)
UNPREPARE_SECONDS = Histogram("partita_plugin_unprepare_seconds", "NodeUnprepareResources duration", buckets=_BUCKETS)
PREPARE_ERRORS = Counter("partita_plugin_prepare_errors_total", "Claims whose preparation failed")
UNPREPARE_ERRORS = Counter("partita_plugin_unprepare_errors_total", "Claims whose unpreparation failed")
PREPARED_CLAIMS = Gauge("partita_plugin_prepared_claims", "Claims prepared on this node")
