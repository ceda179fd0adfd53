"""Prometheus metrics of the kubelet plugin (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PREPARE_SECONDS = Histogram("partita_plugin_prepare_seconds", "NodePrepareResources duration", buckets=_BUCKETS)
UNPREPARE_SECONDS = Histogram("partita_plugin_unprepare_seconds", "NodeUnprepareResources duration", buckets=_BUCKETS)
PREPARE_ERRORS = Counter("partita_plugin_prepare_errors_total", "Claims whose preparation failed")
UNPREPARE_ERRORS = Counter("partita_plugin_unprepare_errors_total", "Claims whose unpreparation failed")
PREPARED_CLAIMS = Gauge("partita_plugin_prepared_claims", "Claims prepared on this node")

# --- Health and usage: the names and labels dashboards, alerts and `partita status` rely on. ---------------
# Declared here first, as a contract; the health monitor (issue 13) and the usage sampler (issue 14) set them.

#: One series per device (whole GPU, MIG device or shared device) with value 1 and the device's current
#: state in ``state`` (healthy | degraded | lost | fatal); the series of its previous state is removed.
DEVICE_HEALTH = Gauge("partita_device_health", "Health state of a published device (1 for its current state)",
                      ["node", "device", "uuid", "state"])
#: Health events seen by the monitor, by kind (xid, ecc_dbe, fallen_off_bus, retired_pages_pending, ...).
HEALTH_EVENTS = Counter("partita_device_health_events_total", "Health events seen by the node's monitor",
                        ["node", "kind"])

_USAGE_LABELS = ["node", "device", "uuid", "mode", "claim_namespace", "claim_name", "pod_namespace", "pod_name"]
#: 0..1; for a whole GPU NVML's GPU utilization, for a MIG device its instance's, for a share the share's
#: processes' part. Series exist only for prepared claims and are deleted with the claim.
GPU_UTILIZATION = Gauge("partita_gpu_utilization_ratio", "GPU utilization of a claim's device (0..1)", _USAGE_LABELS)
GPU_MEMORY_USED = Gauge("partita_gpu_memory_used_bytes", "GPU memory used by a claim's device", _USAGE_LABELS)
GPU_MEMORY_ALLOCATED = Gauge("partita_gpu_memory_allocated_bytes",
                             "GPU memory allocated to a claim's device (whole GPU, MIG slice or share limit)",
                             _USAGE_LABELS)
#: Value 1; joins a claim's device to the physical GPU: ``gpu_uuid`` (always the parent GPU, dcgm-exporter's
#: ``UUID``), ``mig_uuid`` and ``gpu_instance_id`` (dcgm-exporter's ``GPU_I_ID``) for MIG devices.
GPU_DEVICE_INFO = Gauge("partita_gpu_device_info", "A prepared device and the physical GPU behind it",
                        _USAGE_LABELS + ["gpu_uuid", "mig_uuid", "gpu_instance_id", "model", "profile"])
#: 1 while a claim's devices have stayed below the idle threshold for the idle period.
CLAIM_IDLE = Gauge("partita_claim_idle", "1 while a prepared claim has been idle for the configured period",
                   ["node", "claim_namespace", "claim_name", "pod_namespace", "pod_name"])
