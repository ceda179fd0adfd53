"""NVML health events and checks as Partita reads them (issue 13; the table of effects is docs/health.md).

Types and constants of NVML's event set API (``nvmlEventSetCreate`` / ``nvmlDeviceRegisterEvents`` /
``nvmlEventSetWait_v2`` / ``nvmlEventSetFree``) and of the periodic health queries, shared by the real
and the fake backend (the methods are on :class:`driver.nvml.interface.NvmlBackend`).
"""

from __future__ import annotations

from dataclasses import dataclass

#: nvmlEventType* bits (nvml.h). Only XID critical errors and double-bit ECC errors are health events;
#: single-bit ECC, P-state and clock events are normal operation and never registered.
EVENT_TYPE_SINGLE_BIT_ECC = 0x1
EVENT_TYPE_DOUBLE_BIT_ECC = 0x2
EVENT_TYPE_PSTATE = 0x4
EVENT_TYPE_XID_CRITICAL = 0x8
EVENT_TYPE_CLOCK = 0x10
HEALTH_EVENT_TYPES = EVENT_TYPE_XID_CRITICAL | EVENT_TYPE_DOUBLE_BIT_ECC

#: nvmlEventData_t.gpuInstanceId / computeInstanceId of an event on the whole GPU (not on one MIG instance)
NO_INSTANCE = 0xFFFFFFFF

#: XID 79 "GPU has fallen off the bus": every later call on the GPU answers NVML_ERROR_GPU_IS_LOST
XID_FALLEN_OFF_BUS = 79
#: XID 48 "DBE (double bit error) ECC error", reported with the double-bit ECC event
XID_DBE = 48

#: nvmlGpuRecoveryAction_t, read with nvmlDeviceGetFieldValues(NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) (R550+)
FIELD_GPU_RECOVERY_ACTION = 230
RECOVERY_ACTION_NONE = 0
RECOVERY_ACTION_GPU_RESET = 1
RECOVERY_ACTION_NODE_REBOOT = 2
RECOVERY_ACTION_DRAIN_P2P = 3
RECOVERY_ACTION_DRAIN_AND_RESET = 4
RECOVERY_ACTIONS = {RECOVERY_ACTION_NONE: "none", RECOVERY_ACTION_GPU_RESET: "gpu_reset",
                    RECOVERY_ACTION_NODE_REBOOT: "node_reboot", RECOVERY_ACTION_DRAIN_P2P: "drain_p2p",
                    RECOVERY_ACTION_DRAIN_AND_RESET: "drain_and_reset"}

#: the ``kind`` of an NVML event (also a label value of partita_device_health_events_total)
EVENT_XID = "xid"
EVENT_ECC_DBE = "ecc_dbe"


@dataclass(frozen=True)
class HealthEvent:
    """One ``nvmlEventData_t`` of a health event type."""

    gpu_uuid: str
    kind: str                               # EVENT_XID | EVENT_ECC_DBE
    xid: int = 0                            # eventData of an XID event
    gpu_instance_id: int | None = None      # the MIG instance it happened on; None: the whole GPU
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class HealthCheck:
    """What the periodic check reads of a GPU that answers (one that does not raises GpuLostError)."""

    retired_pages_pending: bool = False     # nvmlDeviceGetRetiredPagesPendingStatus (before Ampere)
    remapped_rows_pending: bool = False     # nvmlDeviceGetRemappedRows isPending (Ampere and later)
    remapped_rows_failure: bool = False     # nvmlDeviceGetRemappedRows failureOccurred
    recovery_action: int = RECOVERY_ACTION_NONE
