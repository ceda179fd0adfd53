"""Partita's node side and the layers both sides share.

What the controller (and anything else outside ``driver``) may use, by module: the API types and client
(``api``), the error root (``errors``), the CLI flags every command shares (``cliopts``), the device
inventory and slice builder (``inventory``, ``slices``), NVML (``nvml``), the kubelet plugin (``plugin``,
its own ``__all__`` narrows it), the generated kubelet gRPC stubs (``kubeletapi``) and the command (``cli``).
"""

__all__ = ["api", "cli", "cliopts", "errors", "inventory", "kubeletapi", "logfmt", "nvml", "plugin", "slices"]
