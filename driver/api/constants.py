"""Names that form Partita's public contract between the node driver, the controller and users.

Everything here is part of the published device model (docs/architecture.md §3/§4): changing a value is a
breaking change for every cluster that runs Partita and every workload manifest that selects on it.
"""

from __future__ import annotations

#: Default DRA driver name (DNS subdomain, ≤63 chars). Configurable per install (``--driver-name``).
DEFAULT_DRIVER_NAME = "gpu.partita.dev"

#: Device taint the driver puts on every device in controller mode, so kube-scheduler's allocator
#: skips Partita devices and only Partita's controller allocates them (docs/architecture.md §4).
MANAGED_TAINT_KEY = "partita.dev/managed"
MANAGED_TAINT_VALUE = "controller"
MANAGED_TAINT_EFFECT = "NoSchedule"

#: Device taint the driver puts on a device whose GPU or MIG instance is unhealthy (docs/health.md): the value
#: is the health state (degraded | fatal | lost); the effect is configurable per state (defaults: NoSchedule
#: for degraded, NoExecute for fatal and lost). Removed when the device has recovered.
HEALTH_TAINT_KEY = "gpu.partita.dev/unhealthy"

#: Finalizer the controller puts on every claim it allocates; removed once it has released the claim.
CLAIM_FINALIZER = "partita.dev/allocation"

#: Label on every ResourceSlice the driver publishes, saying which allocator owns its devices:
#: ``controller`` (Partita's controller, devices tainted) or ``scheduler`` (kube-scheduler, no taint).
SLICE_ALLOCATION_MODE_LABEL = "partita.dev/allocation-mode"
ALLOCATION_MODE_CONTROLLER = "controller"
ALLOCATION_MODE_SCHEDULER = "scheduler"
ALLOCATION_MODES = (ALLOCATION_MODE_CONTROLLER, ALLOCATION_MODE_SCHEDULER)

#: Label on every ResourceSlice naming the node whose plugin published it (for selectors and cleanup).
SLICE_NODE_LABEL = "partita.dev/node"

#: Values of the ``type`` attribute (driver domain) on every published device.
DEVICE_TYPE_GPU = "gpu"
DEVICE_TYPE_MIG = "mig"
DEVICE_TYPE_SHARED = "shared"
DEVICE_TYPES = (DEVICE_TYPE_GPU, DEVICE_TYPE_MIG, DEVICE_TYPE_SHARED)

#: DeviceClass names shipped by the chart (and created by the sandbox), one per device type.
DEVICE_CLASS_GPU = "gpu.partita.dev"
DEVICE_CLASS_MIG = "mig.partita.dev"
DEVICE_CLASS_SHARED = "shared.partita.dev"

#: Attribute names (unqualified names live in the driver's domain).
ATTR_TYPE = "type"
ATTR_UUID = "uuid"
ATTR_PRODUCT_NAME = "productName"
ATTR_BRAND = "brand"
ATTR_ARCHITECTURE = "architecture"
ATTR_CUDA_COMPUTE_CAPABILITY = "cudaComputeCapability"
ATTR_DRIVER_VERSION = "driverVersion"
ATTR_CUDA_DRIVER_VERSION = "cudaDriverVersion"
ATTR_MIG_CAPABLE = "migCapable"
ATTR_MIG_PROFILE = "migProfile"
ATTR_MIG_PLACEMENT = "migPlacement"
ATTR_PARENT_UUID = "parentUUID"
ATTR_NUMA_NODE = "numaNode"
#: GPU interconnect topology (driver domain; docs/device-model.md "Topology"): the NVLink fabric clique
#: "<clusterUuid>.<cliqueId>", the node-local NVLink domain (GPUs connected over NVLink, named by their
#: lowest PCI bus ID) and how many of the node's other GPUs this one reaches over NVLink.
ATTR_FABRIC_CLIQUE = "fabricClique"
ATTR_NVLINK_DOMAIN = "nvlinkDomain"
ATTR_NVLINK_PEERS = "nvlinkPeers"
ATTR_PCI_BUS_ID = "resource.kubernetes.io/pciBusID"
ATTR_PCIE_ROOT = "resource.kubernetes.io/pcieRoot"

#: Capacity names (driver domain).
CAP_MEMORY = "memory"
CAP_MULTIPROCESSORS = "multiprocessors"

#: CDI: vendor and class of the device kind Partita writes (``k8s.<driver>/gpu``), one spec per claim.
CDI_CLASS = "gpu"


def cdi_vendor(driver_name: str) -> str:
    """CDI vendor for a driver name, as the upstream helpers name it (``k8s.<driver>``)."""
    return f"k8s.{driver_name}"


def cdi_kind(driver_name: str) -> str:
    return f"{cdi_vendor(driver_name)}/{CDI_CLASS}"


def managed_taint() -> dict:
    """The device taint a driver in controller mode publishes on every device (API JSON form)."""
    return {"key": MANAGED_TAINT_KEY, "value": MANAGED_TAINT_VALUE, "effect": MANAGED_TAINT_EFFECT}


def managed_toleration() -> dict:
    """The toleration the controller adds to each result it writes (API JSON form).

    Key and effect are explicit (never an empty key or effect), so the toleration never covers a
    ``NoExecute`` health taint (controller-mode notes §5).
    """
    return {"key": MANAGED_TAINT_KEY, "operator": "Exists", "effect": MANAGED_TAINT_EFFECT}


def health_taint(state: str, effect: str, time_added: str) -> dict:
    """The device taint of an unhealthy device (API JSON form); ``time_added`` is when it entered the state,
    so a republished slice keeps the taint's time (tolerationSeconds count from it)."""
    return {"key": HEALTH_TAINT_KEY, "value": state, "effect": effect, "timeAdded": time_added}
