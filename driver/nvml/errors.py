"""NVML errors, carrying NVML's own return codes so real and fake refusals look the same.

Codes are ``nvmlReturn_t`` values from nvml.h (NVIDIA/go-nvml pkg/nvml/nvml.h, also the
``NVML_ERROR_*`` constants of nvidia-ml-py). The real backend maps ``pynvml.NVMLError.value`` to
these classes; the fake raises them where hardware would.
"""

from __future__ import annotations

from driver.errors import PartitaError

UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NO_PERMISSION = 4
ALREADY_INITIALIZED = 5
NOT_FOUND = 6
INSUFFICIENT_SIZE = 7
INSUFFICIENT_POWER = 8
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
IRQ_ISSUE = 11
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
CORRUPTED_INFOROM = 14
GPU_IS_LOST = 15
RESET_REQUIRED = 16
OPERATING_SYSTEM = 17
LIB_RM_VERSION_MISMATCH = 18
IN_USE = 19
MEMORY = 20
NO_DATA = 21
VGPU_ECC_NOT_ENABLED = 22
INSUFFICIENT_RESOURCES = 23
UNKNOWN = 999

_NAMES = {
    UNINITIALIZED: "Uninitialized",
    INVALID_ARGUMENT: "Invalid Argument",
    NOT_SUPPORTED: "Not Supported",
    NO_PERMISSION: "Insufficient Permissions",
    ALREADY_INITIALIZED: "Already Initialized",
    NOT_FOUND: "Not Found",
    DRIVER_NOT_LOADED: "Driver Not Loaded",
    TIMEOUT: "Timeout",
    LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    FUNCTION_NOT_FOUND: "Function Not Found",
    GPU_IS_LOST: "GPU is lost",
    RESET_REQUIRED: "GPU requires restart",
    LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch",
    IN_USE: "In use by another client",
    MEMORY: "Insufficient Memory",
    NO_DATA: "No data",
    INSUFFICIENT_RESOURCES: "Insufficient resources",
    UNKNOWN: "Unknown Error",
}


class NvmlError(PartitaError):
    """An NVML call failed. ``code`` is the ``nvmlReturn_t`` value."""

    code: int = UNKNOWN

    def __init__(self, message: str, code: int | None = None):
        if code is not None:
            self.code = code
        super().__init__(f"{message} (NVML: {_NAMES.get(self.code, 'error')}, code {self.code})")
        self.detail = message


class NotSupportedError(NvmlError):
    code = NOT_SUPPORTED


class InvalidArgumentError(NvmlError):
    code = INVALID_ARGUMENT


class NotFoundError(NvmlError):
    code = NOT_FOUND


class NoPermissionError(NvmlError):
    code = NO_PERMISSION


class InUseError(NvmlError):
    code = IN_USE


class InsufficientResourcesError(NvmlError):
    code = INSUFFICIENT_RESOURCES


class ResetRequiredError(NvmlError):
    code = RESET_REQUIRED


class LibraryNotFoundError(NvmlError):
    code = LIBRARY_NOT_FOUND


class UninitializedError(NvmlError):
    code = UNINITIALIZED


class GpuLostError(NvmlError):
    code = GPU_IS_LOST


_BY_CODE: dict[int, type[NvmlError]] = {
    cls.code: cls
    for cls in (
        NotSupportedError, InvalidArgumentError, NotFoundError, NoPermissionError, InUseError,
        InsufficientResourcesError, ResetRequiredError, LibraryNotFoundError, UninitializedError,
        GpuLostError,
    )
}


def error_for_code(code: int, message: str) -> NvmlError:
    """The error class for an ``nvmlReturn_t`` value (unknown codes keep their number)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return NvmlError(message, code)
    return cls(message)
