"""Device and counter-set names: part of the published device model (documented in README).

Names must stay the same across reboots and driver reloads, so they never use the NVML index or
minor number (both shift when a GPU falls off the bus or is rebound). They derive from the GPU UUID,
which NVIDIA burns into the board:

* whole GPU:      ``gpu-<first 8 hex digits of the UUID>``                e.g. ``gpu-5b3c04f1``
* MIG partition:  ``<gpu name>-mig-<profile>-<placement start>``        e.g. ``gpu-5b3c04f1-mig-1g10gb-3``
  (profile with ``.`` dropped and ``+`` turned into ``-``: ``1g.10gb+me`` -> ``1g10gb-me``)
* shared GPU:     ``<gpu name>-shared``                                  e.g. ``gpu-5b3c04f1-shared``
* counter set:    ``<gpu name>-counters``

All are DNS labels (lowercase alphanumerics and ``-``, at most 63 characters).
"""

from __future__ import annotations

import re

#: Kubernetes' DNS-1123 label and subdomain (k8s.io/apimachinery pkg/util/validation), matched whole
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
MAX_DNS_LABEL = 63
MAX_DNS_SUBDOMAIN = 253
_UUID_HEX = re.compile(r"[0-9a-fA-F]")


#: the name part of a qualified name (label and taint keys, attribute names) and a non-empty label value
#: (k8s.io/apimachinery pkg/util/validation IsQualifiedName, IsValidLabelValue), matched whole
NAME_PART = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
MAX_NAME_PART = 63


def is_qualified_name(name: object) -> bool:
    """``[prefix/]name``: name at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends; a prefix,
    when there is a '/', a non-empty DNS-1123 subdomain."""
    if not isinstance(name, str):
        return False
    prefix, slash, part = name.rpartition("/")
    if slash and not is_dns_subdomain(prefix):
        return False
    return len(part) <= MAX_NAME_PART and NAME_PART.fullmatch(part) is not None


def is_label_value(value: object) -> bool:
    """Empty, or at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends."""
    return isinstance(value, str) and (value == "" or (len(value) <= MAX_NAME_PART
                                                       and NAME_PART.fullmatch(value) is not None))


def is_dns_label(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MAX_DNS_LABEL and DNS_LABEL.fullmatch(name) is not None


def is_dns_subdomain(name: object, max_len: int = MAX_DNS_SUBDOMAIN) -> bool:
    return isinstance(name, str) and len(name) <= max_len and DNS_SUBDOMAIN.fullmatch(name) is not None


def gpu_device_name(uuid: str) -> str:
    """Name of the whole-GPU device for a GPU UUID such as ``GPU-5b3c04f1-....``."""
    body = uuid[4:] if uuid.upper().startswith("GPU-") else uuid
    hex_digits = "".join(_UUID_HEX.findall(body)).lower()
    if len(hex_digits) < 8:
        raise ValueError(f"GPU UUID {uuid!r} has fewer than 8 hex digits; cannot derive a device name")
    return f"gpu-{hex_digits[:8]}"


def mig_profile_label(profile_name: str) -> str:
    """``1g.10gb`` -> ``1g10gb``; ``1g.10gb+me`` -> ``1g10gb-me``."""
    return profile_name.lower().replace(".", "").replace("+", "-")


def mig_device_name(gpu_name: str, profile_name: str, placement_start: int) -> str:
    return f"{gpu_name}-mig-{mig_profile_label(profile_name)}-{placement_start}"


def shared_device_name(gpu_name: str) -> str:
    return f"{gpu_name}-shared"


def counter_set_name(gpu_name: str) -> str:
    return f"{gpu_name}-counters"
